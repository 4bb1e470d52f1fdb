//! Wire-compatibility replay: proves that our `ppserver` answers an unmodified
//! ppft 1.7.8 client byte for byte like ppft's own Python ppserver does.
//!
//! `fixtures/*.txt` are transcripts of real TCP connections between ppft's
//! client and ppft's Python ppserver, captured by a recording proxy
//! (`compat-tests/.venv/bin/python scripts/record-fixtures`; format in
//! `fixtures/README.md`). For every file this test starts our binary with the
//! recorded secret and worker count (a fresh server per file, so every file
//! starts with fresh workers, as it was recorded), plays the client side over
//! a plain `TcpStream` and checks every server frame:
//! - the version frame and `OK`/`FAILED` are equal to the recording;
//! - the nonce is at least 16 ASCII letters; the client's answer is recomputed
//!   from our nonce (or deliberately wrong where the recording got `FAILED`,
//!   after which the server must close the connection);
//! - STAT: the worker count is equal, TIME answers parse as floats >= 0;
//! - EXEC: result pickles (made by the same ppft/dill/python worker) are equal
//!   byte for byte, except that the path of ppft's directory in a worker
//!   traceback is rewritten to the local one when the venv lives elsewhere.
//!
//! The workers run under `$PPSERVER_TEST_PYTHON`, or else the compat venv
//! `compat-tests/.venv/bin/python` that `scripts/test.sh` creates; with
//! neither (a fresh clone), the replay is skipped with a message.

use sha1::{Digest, Sha1};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long our server may take to start listening (it spawns Python workers).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for any single answer; a missing frame fails, not hangs.
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);
/// After the last recorded frame, the server must stay silent this long.
const QUIET_TIME: Duration = Duration::from_millis(100);
/// Attempts with a fresh port when the server dies before listening (the
/// port picked by binding :0 may have been taken again in between).
const START_ATTEMPTS: usize = 5;

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Client,
    Server,
}

struct Fixture {
    name: String,
    meta: Vec<(String, String)>,
    frames: Vec<(Dir, Vec<u8>)>,
}

impl Fixture {
    fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, key: &str) -> &str {
        self.meta(key)
            .unwrap_or_else(|| panic!("{}: no `# {key}:` line", self.name))
    }
}

fn hex_decode(hex: &str) -> Result<Vec<u8>, String> {
    fn nibble(c: u8) -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("bad hex digit {:?}", c as char)),
        }
    }
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    hex.chunks(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_fixture(path: &Path) -> Fixture {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut fixture = Fixture {
        name: name.clone(),
        meta: Vec::new(),
        frames: Vec::new(),
    };
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { panic!("{name}:{}: {why}: {line:?}", n + 1) };
        if let Some(rest) = line.strip_prefix("# ") {
            let (key, value) = rest
                .split_once(": ")
                .unwrap_or_else(|| bad("not `# key: value`"));
            fixture.meta.push((key.to_string(), value.to_string()));
        } else if line.is_empty() {
            continue;
        } else {
            let dir = match line.as_bytes()[0] {
                b'C' => Dir::Client,
                b'S' => Dir::Server,
                _ => bad("expected `C <hex>` or `S <hex>`"),
            };
            // An empty payload is written as "C " / "S ", but tolerate editors
            // that strip the trailing space.
            let hex = line[1..].strip_prefix(' ').unwrap_or(&line[1..]);
            let payload = hex_decode(hex).unwrap_or_else(|e| bad(&e));
            fixture.frames.push((dir, payload));
        }
    }
    fixture
}

/// Owns the server process; killing it in `drop` also covers panics.
struct ServerGuard(Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Starts our server for `fixture` and returns it with the first accepted
/// connection (connecting is how we learn that it listens; that connection is
/// then used for the replay).
fn start_server(fixture: &Fixture, python: &Path, log: &Path) -> (ServerGuard, TcpStream) {
    for _ in 0..START_ATTEMPTS {
        let port = free_port();
        // Server output goes to a log file that failure messages point to,
        // instead of cluttering the output of passing runs.
        let out = File::create(log).expect("create server log");
        let child = Command::new(env!("CARGO_BIN_EXE_ppserver"))
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-s", fixture.required("secret")])
            .args(["-w", fixture.required("workers")])
            .arg("--python")
            .arg(python)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn ppserver");
        let mut server = ServerGuard(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                return (server, stream);
            }
            if let Some(status) = server.0.try_wait().unwrap() {
                eprintln!(
                    "{}: ppserver on port {port} exited ({status}) before listening; \
                     retrying on another port (log: {})",
                    fixture.name,
                    log.display()
                );
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: ppserver did not listen on port {port} within {START_TIMEOUT:?} \
                     (log: {})",
                    fixture.name,
                    log.display()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "{}: ppserver failed to start {START_ATTEMPTS} times (log: {})",
        fixture.name,
        log.display()
    );
}

fn send_frame(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    // One write per frame: header and payload in one segment.
    stream.write_all(&ppserver::protocol::wire::encode_frame(payload))
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header)?;
    let size = u64::from_be_bytes(header);
    if size > 64 << 20 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("absurd frame length {size}"),
        ));
    }
    let mut payload = vec![0u8; size as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Readable rendering of a payload for error messages, truncated.
fn show(bytes: &[u8]) -> String {
    const MAX: usize = 300;
    let text = bytes.escape_ascii().to_string();
    if text.len() > MAX {
        format!("{}... ({} bytes)", &text[..MAX], bytes.len())
    } else {
        format!("\"{text}\" ({} bytes)", bytes.len())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Rewrites the recorded ppft directory `from` to the local one `to` in a
/// result pickle (protocol 2, where text is BINUNICODE: `X`, u32 LE length,
/// UTF-8 bytes) and fixes the length of the string that contains it.
fn relocate(pickle: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = pickle.to_vec();
    let mut start = 0;
    while let Some(pos) = find(&out[start..], from).map(|p| p + start) {
        // The nearest `X` header before the match whose string covers it.
        let header = (0..pos.saturating_sub(4)).rev().find(|&j| {
            let len = u32::from_le_bytes(out[j + 1..j + 5].try_into().unwrap()) as usize;
            out[j] == b'X' && j + 5 + len >= pos + from.len() && j + 5 + len <= out.len()
        });
        let Some(j) = header else {
            return out; // not inside a string: leave it, the comparison fails
        };
        let len = u32::from_le_bytes(out[j + 1..j + 5].try_into().unwrap()) as usize;
        let new_len = (len - from.len() + to.len()) as u32;
        out[j + 1..j + 5].copy_from_slice(&new_len.to_le_bytes());
        out.splice(pos..pos + from.len(), to.iter().copied());
        start = pos + to.len();
    }
    out
}

/// Where ppft lives for `python`, as a worker's traceback names it.
fn local_ppft_dir(python: &Path) -> String {
    let out = Command::new(python)
        .args([
            "-c",
            "import os, ppft; print(os.path.dirname(os.path.abspath(ppft.__file__)))",
        ])
        .output()
        .expect("run python to locate ppft");
    assert!(
        out.status.success(),
        "{} cannot import ppft",
        python.display()
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

fn sha1_hex(data: &[u8]) -> String {
    hex_encode(&Sha1::digest(data))
}

/// Plays the client side of one transcript against a fresh server.
fn replay(fixture: &Fixture, python: &Path, ppft_dir: Option<&str>) -> Result<(), String> {
    let log =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("replay-{}.log", fixture.name));
    let (_server, mut stream) = start_server(fixture, python, &log);
    stream.set_read_timeout(Some(FRAME_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();

    let secret = fixture.required("secret").as_bytes();
    let name = &fixture.name;
    let fail = |i: usize, what: String| {
        Err(format!(
            "{name}, frame {}: {what} (server log: {})",
            i + 1,
            log.display()
        ))
    };

    let mut nonce: Option<Vec<u8>> = None;
    let mut client_frames = 0; // client frames sent so far
    let mut server_frames = 0; // server frames read so far
    let mut kind: Option<Vec<u8>> = None; // STAT or EXEC, once sent
    let mut stat_answers = 0;
    let mut failed = false;

    for (i, (dir, recorded)) in fixture.frames.iter().enumerate() {
        if *dir == Dir::Client {
            client_frames += 1;
            let payload = if client_frames == 1 {
                // The answer depends on the nonce, so it is recomputed. Where
                // the recording shows the server rejecting it, send a wrong
                // one on purpose.
                let Some(nonce) = &nonce else {
                    return fail(i, "transcript has a client frame before the nonce".into());
                };
                let rejected = matches!(
                    fixture.frames.get(i + 1),
                    Some((Dir::Server, next)) if next == b"FAILED"
                );
                let key: Vec<u8> = if rejected {
                    [b"not-".as_slice(), secret].concat()
                } else {
                    secret.to_vec()
                };
                sha1_hex(&[nonce.as_slice(), &key].concat()).into_bytes()
            } else {
                if client_frames == 2 {
                    kind = Some(recorded.clone());
                }
                recorded.clone()
            };
            if let Err(e) = send_frame(&mut stream, &payload) {
                return fail(i, format!("sending {}: {e}", show(&payload)));
            }
            continue;
        }

        server_frames += 1;
        let got = match read_frame(&mut stream) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let what = format!(
                    "expected {}, no answer in {FRAME_TIMEOUT:?}",
                    show(recorded)
                );
                return fail(i, what);
            }
            Err(e) => return fail(i, format!("expected {}, read failed: {e}", show(recorded))),
        };
        match (server_frames, kind.as_deref()) {
            (2, _) => {
                if got.len() < 16 || !got.iter().all(u8::is_ascii_alphabetic) {
                    return fail(
                        i,
                        format!("nonce is not >= 16 ASCII letters: {}", show(&got)),
                    );
                }
                nonce = Some(got);
            }
            (_, Some(b"STAT")) => {
                stat_answers += 1;
                if stat_answers == 1 {
                    if got != *recorded {
                        return fail(
                            i,
                            format!(
                                "worker count: expected {}, got {}",
                                show(recorded),
                                show(&got)
                            ),
                        );
                    }
                } else {
                    let time = std::str::from_utf8(&got)
                        .ok()
                        .and_then(|t| t.parse::<f64>().ok());
                    if !matches!(time, Some(t) if t >= 0.0) {
                        return fail(
                            i,
                            format!("TIME answer is not a float >= 0: {}", show(&got)),
                        );
                    }
                }
            }
            _ => {
                // Version, OK/FAILED and EXEC results: byte for byte. Result
                // tracebacks name ppft's directory, which depends on where
                // the venv is; compare as if recorded with the local one.
                let expected = match (fixture.meta("ppft-dir"), ppft_dir) {
                    (Some(from), Some(to)) if from != to => {
                        relocate(recorded, from.as_bytes(), to.as_bytes())
                    }
                    _ => recorded.clone(),
                };
                if got != expected {
                    let offset = got
                        .iter()
                        .zip(&expected)
                        .take_while(|(a, b)| a == b)
                        .count();
                    return fail(
                        i,
                        format!(
                            "mismatch at byte {offset}:\n  expected {}\n  got      {}",
                            show(&expected),
                            show(&got)
                        ),
                    );
                }
                failed |= got == b"FAILED";
            }
        }
    }

    let end = fixture.frames.len();
    if failed {
        // After FAILED ppft closes the connection; the client sees EOF (a
        // reset is just as final for it).
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(_) => return fail(end, "expected EOF after FAILED, got more data".into()),
            Err(e) => return fail(end, format!("expected EOF after FAILED: {e}")),
        }
    } else {
        // The recording has nothing more from the server, so neither may we.
        stream.set_read_timeout(Some(QUIET_TIME)).unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => {
                return fail(
                    end,
                    "server closed the connection after the last frame".into(),
                )
            }
            Ok(_) => return fail(end, "server sent data the recording does not have".into()),
            Err(e) => return fail(end, format!("after the last frame: {e}")),
        }
    }
    Ok(())
}

/// The interpreter for the workers: `$PPSERVER_TEST_PYTHON`, which must
/// exist when it is set (`scripts/test.sh` sets it, so the replay always
/// runs there), else the compat venv if it exists; `None` when neither is
/// there, as on a fresh clone before `scripts/test.sh` has run.
fn find_test_python(env: Option<PathBuf>, manifest_dir: &Path) -> Option<PathBuf> {
    if let Some(python) = env {
        assert!(
            python.exists(),
            "PPSERVER_TEST_PYTHON={} does not exist",
            python.display()
        );
        return Some(python);
    }
    Some(manifest_dir.join("compat-tests/.venv/bin/python")).filter(|p| p.exists())
}

#[test]
fn a_fresh_clone_without_a_venv_skips_the_replay() {
    // Regression: plain `cargo test` on a fresh clone failed with "no
    // worker Python"; it must skip instead.
    let empty = std::env::temp_dir().join(format!("ppserver-no-venv-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(find_test_python(None, &empty), None);
    let venv_python = empty.join("compat-tests/.venv/bin/python");
    std::fs::create_dir_all(venv_python.parent().unwrap()).unwrap();
    std::fs::write(&venv_python, "").unwrap();
    assert_eq!(find_test_python(None, &empty), Some(venv_python.clone()));
    assert_eq!(
        find_test_python(Some(PathBuf::from("/usr/bin/env")), &empty),
        Some(PathBuf::from("/usr/bin/env")),
        "the environment wins"
    );
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn replay_fixtures() {
    let Some(python) = find_test_python(
        std::env::var_os("PPSERVER_TEST_PYTHON").map(PathBuf::from),
        Path::new(env!("CARGO_MANIFEST_DIR")),
    ) else {
        eprintln!(
            "SKIPPED replay_fixtures: no worker Python. scripts/test.sh runs it (it creates \
             compat-tests/.venv with ppft==1.7.8 and dill==0.4.1 and sets PPSERVER_TEST_PYTHON)"
        );
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    let fixtures: Vec<Fixture> = paths.iter().map(|p| parse_fixture(p)).collect();

    let ppft_dir = fixtures
        .iter()
        .any(|f| f.meta("ppft-dir").is_some())
        .then(|| local_ppft_dir(&python));

    // Run every file and report all failures together.
    let failures: Vec<String> = fixtures
        .iter()
        .filter_map(|f| replay(f, &python, ppft_dir.as_deref()).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

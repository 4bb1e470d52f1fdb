//! The one pickle the server writes itself: `(None, text)`, the shape of a
//! pp result whose job failed. Clients unpickle it, print the text and hand
//! `None` to the caller, exactly as for a job that raised.

use bytes::{BufMut, Bytes, BytesMut};

/// Pickle protocol 2 of `(None, text)`; every Python 3 unpickler reads it.
pub fn none_with_text(text: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 12);
    out.put_slice(b"\x80\x02"); // PROTO 2
    out.put_u8(b'N'); // NONE
    out.put_u8(b'X'); // BINUNICODE: u32 little-endian length, then UTF-8
    out.put_u32_le(text.len() as u32);
    out.put_slice(text.as_bytes());
    out.put_u8(0x86); // TUPLE2
    out.put_u8(b'.'); // STOP
    out.freeze()
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_python_pickle_without_memo() {
        // pickle.dumps((None, 'hi'), 2) is b'\x80\x02NX\x02\x00\x00\x00hiq\x00\x86q\x01.';
        // the same opcodes without the memo puts (q..) load to the same value.
        assert_eq!(
            &super::none_with_text("hi")[..],
            b"\x80\x02NX\x02\x00\x00\x00hi\x86."
        );
    }
}

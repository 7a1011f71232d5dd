//! Percent-encoding for the URLs the worker builds itself (Runpod's job routes, Supabase
//! object paths): one loop, each caller naming the bytes its URL part may hold literally.

/// `s` with every byte percent-encoded (`%XX`, upper-case hex) except ASCII letters and digits
/// and the bytes in `keep`.
pub fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_letters_digits_and_the_named_bytes_and_encodes_the_rest_bytewise() {
        assert_eq!(percent_encode("aZ09-x", b"-"), "aZ09-x");
        assert_eq!(percent_encode("a-b c", b""), "a%2Db%20c");
        // Multi-byte characters, each byte on its own.
        assert_eq!(percent_encode("é", b""), "%C3%A9");
    }
}

//! The usage a response reports, found as its bytes pass.

/// Scans a response's bytes as they pass for the last `"total_tokens":N` AOAI wrote (in the
/// `usage` of a body, or of a stream's usage frame), without parsing the response. A
/// `"total_tokens"` inside generated text is escaped (`\"`) in the JSON and is not taken.
#[derive(Debug, Default)]
pub(crate) struct UsageScan {
    /// The end of the previous chunk, so a key cut between two chunks is still found.
    tail: Vec<u8>,
    pub total: Option<u64>,
}

const KEY: &[u8] = b"\"total_tokens\":";

impl UsageScan {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        // Enough of the previous chunk for the key and a number cut across the boundary.
        let keep = KEY.len() + 24;
        let mut joined = std::mem::take(&mut self.tail);
        joined.extend_from_slice(chunk);
        for at in memchr::memmem::find_iter(&joined, KEY) {
            if at > 0 && joined[at - 1] == b'\\' {
                continue;
            }
            let digits: Vec<u8> = joined[at + KEY.len()..]
                .iter()
                .skip_while(|b| b.is_ascii_whitespace())
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            let ends_in_chunk = at + KEY.len() + digits.len() < joined.len();
            if !digits.is_empty()
                && ends_in_chunk
                && let Ok(n) = std::str::from_utf8(&digits).unwrap_or("").parse()
            {
                self.total = Some(n);
            }
        }
        let start = joined.len().saturating_sub(keep);
        self.tail = joined.split_off(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_finds_the_last_usage_however_the_bytes_are_cut() {
        let body = br#"{"choices":[{"message":{"content":"say \"total_tokens\":999"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        for cut in 1..body.len() {
            let mut scan = UsageScan::default();
            scan.push(&body[..cut]);
            scan.push(&body[cut..]);
            assert_eq!(scan.total, Some(12), "cut at {cut}");
        }
    }
}

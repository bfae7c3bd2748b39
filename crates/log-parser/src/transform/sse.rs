//! An incremental Server-Sent Events parser (WHATWG HTML "Parsing an event stream"): lines end
//! with CRLF, LF or CR; `data` lines of one event join with `\n`; a blank line dispatches;
//! lines starting with `:` are comments. Where the byte stream was cut does not matter: feeding
//! it in any pieces yields the same events as feeding it whole.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
    event: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i] {
                b'\n' => {
                    let line = self.pending[start..i].to_vec();
                    self.line(&line, &mut out);
                    start = i + 1;
                }
                b'\r' => {
                    // A CR at the end of what we have may be the first half of a CRLF.
                    if i + 1 == self.pending.len() {
                        break;
                    }
                    let line = self.pending[start..i].to_vec();
                    self.line(&line, &mut out);
                    if self.pending[i + 1] == b'\n' {
                        i += 1;
                    }
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: a final line without terminator and an event without its blank line
    /// are still delivered, since cut streams are exactly the ones worth recording.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.strip_suffix(b"\r").unwrap_or(&rest);
        if !rest.is_empty() {
            self.line(rest, &mut out);
        }
        self.dispatch(&mut out);
        out
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => match self.data.as_mut() {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if let Some(data) = self.data.take() {
            out.push(SseEvent { event, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse_whole(bytes: &[u8]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = p.push(bytes);
        out.extend(p.finish());
        out
    }

    #[test]
    fn framing_rules() {
        let events = parse_whole(
            b": comment\r\ndata: a\r\ndata:b\r\n\r\nevent: x\rdata: {\"k\":1}\r\rdata: [DONE]\n\n",
        );
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].data, "a\nb");
        assert_eq!(events[1].event.as_deref(), Some("x"));
        assert_eq!(events[1].data, "{\"k\":1}");
        assert_eq!(events[2].data, "[DONE]");
    }

    #[test]
    fn cut_stream_still_yields_its_last_event() {
        let events = parse_whole(b"data: one\n\ndata: two");
        assert_eq!(
            events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
    }

    proptest! {
        #[test]
        fn chunk_boundaries_do_not_matter(
            events in proptest::collection::vec("[a-z{}\":, ]{0,20}", 1..8),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let text: String = events.iter().map(|e| format!("data: {e}{nl}{nl}")).collect();
            let bytes = text.as_bytes();
            let whole = parse_whole(bytes);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut p = SseParser::new();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in points {
                pieces.extend(p.push(&bytes[last..c]));
                last = c;
            }
            pieces.extend(p.push(&bytes[last..]));
            pieces.extend(p.finish());
            prop_assert_eq!(&pieces, &whole);
            prop_assert_eq!(whole.iter().map(|e| e.data.clone()).collect::<Vec<_>>(), events);
        }
    }
}

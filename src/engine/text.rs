//! Turning token bytes into text a client may see: whole UTF-8 characters only, and never
//! a byte of a stop string.

/// Reassembles UTF-8 from token pieces. A multi-byte character split over two tokens is
/// held back until it is complete, then emitted once.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Appends `bytes` and returns every character that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(err) => {
                    let (valid, after) = rest.split_at(err.valid_up_to());
                    // `valid` was just checked by from_utf8.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match err.error_len() {
                        // Truly invalid bytes can never complete: replace them, as every
                        // lossy decoder does, and carry on after them.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drain_to = self.pending.len() - keep;
        self.pending.drain(..drain_to);
        out
    }

    /// Whatever is left when the sequence ends; only a truncated character can be here.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Outcome of feeding text through a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub struct Matched {
    /// Text that is safe to send now.
    pub emit: String,
    /// A stop string was found; `emit` holds everything before it and generation must end.
    pub stopped: bool,
}

/// Finds stop strings across token boundaries. Text that could be the start of a stop
/// string is held back until it either completes the stop string or cannot.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Matched {
        if self.stops.is_empty() {
            return Matched {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = earliest {
            let emit = self.held[..at].to_owned();
            self.held.clear();
            return Matched {
                emit,
                stopped: true,
            };
        }
        let keep = self.longest_stop_prefix_suffix();
        let split = self.held.len() - keep;
        let emit = self.held[..split].to_owned();
        self.held.drain(..split);
        Matched {
            emit,
            stopped: false,
        }
    }

    /// Held-back text when generation ends for another reason: it was not a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn character_split_over_two_tokens_is_emitted_once_whole() {
        let crab = "🦀".as_bytes();
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.push(&crab[..1]), "");
        assert_eq!(decoder.push(&crab[1..3]), "");
        assert_eq!(decoder.push(&[crab[3], b'!']), "🦀!");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_one_replacement_each_and_decoding_continues() {
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
    }

    #[test]
    fn truncated_character_at_the_end_is_flushed_lossily() {
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.push(&"é".as_bytes()[..1]), "");
        assert_eq!(decoder.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_split_across_pushes_is_found_and_not_emitted() {
        let mut stops = StopMatcher::new(vec!["END".into()]);
        assert_eq!(stops.push("hello E").emit, "hello ");
        let matched = stops.push("ND tail");
        assert_eq!(
            matched,
            Matched {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_prefix_is_released_when_it_stops_matching() {
        let mut stops = StopMatcher::new(vec!["END".into()]);
        assert_eq!(stops.push("E").emit, "");
        assert_eq!(stops.push("x").emit, "Ex");
        assert_eq!(stops.push("EN").emit, "");
        assert_eq!(stops.finish(), "EN");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut stops = StopMatcher::new(vec!["world".into(), "lo".into()]);
        let matched = stops.push("hello world");
        assert_eq!(matched.emit, "hel");
        assert!(matched.stopped);
    }

    #[test]
    fn multibyte_stop_strings_do_not_split_characters() {
        let mut stops = StopMatcher::new(vec!["日本".into()]);
        assert_eq!(stops.push("こんにちは日").emit, "こんにちは");
        assert!(stops.push("本").stopped);
    }

    #[test]
    fn no_stop_strings_pass_text_through() {
        let mut stops = StopMatcher::new(vec![String::new()]);
        assert_eq!(stops.push("abc").emit, "abc");
    }
}

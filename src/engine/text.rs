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
///
/// Each stop string runs a KMP automaton over the text as it arrives, so a token costs
/// O(its bytes × stop strings) whatever the stop strings' lengths, and only the longest
/// partial match is kept.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<StopAutomaton>,
    /// Text not sent yet: the longest suffix that may still become a stop string.
    held: String,
}

#[derive(Debug)]
struct StopAutomaton {
    pattern: Vec<u8>,
    /// KMP failure function: for each prefix length, the longest proper prefix of the
    /// pattern that is also a suffix of that prefix.
    fallback: Vec<usize>,
    /// Bytes of the pattern matched by the end of the text so far.
    matched: usize,
}

impl StopAutomaton {
    fn new(pattern: &str) -> Self {
        let pattern = pattern.as_bytes().to_vec();
        let mut fallback = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fallback[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Self {
            pattern,
            fallback,
            matched: 0,
        }
    }

    /// Feeds one byte; true when the whole pattern ends here.
    fn advance(&mut self, byte: u8) -> bool {
        while self.matched > 0 && self.pattern[self.matched] != byte {
            self.matched = self.fallback[self.matched - 1];
        }
        if self.pattern[self.matched] == byte {
            self.matched += 1;
        }
        if self.matched == self.pattern.len() {
            self.matched = self.fallback[self.matched - 1];
            return true;
        }
        false
    }
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| StopAutomaton::new(s))
                .collect(),
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
        let base = self.held.len();
        self.held.push_str(text);
        // The earliest start of a stop string that ends in this text (a longer one ending
        // later in the same text may start earlier).
        let mut earliest: Option<usize> = None;
        for (offset, byte) in text.bytes().enumerate() {
            let end = base + offset + 1;
            for stop in &mut self.stops {
                if stop.advance(byte) {
                    let start = end - stop.pattern.len();
                    earliest = Some(earliest.map_or(start, |e| e.min(start)));
                }
            }
        }
        if let Some(at) = earliest {
            let emit = self.held[..at].to_owned();
            self.held.clear();
            self.stops.iter_mut().for_each(|s| s.matched = 0);
            return Matched {
                emit,
                stopped: true,
            };
        }
        // A partial match starts where a stop string starts, so on a character boundary.
        let keep = self.stops.iter().map(|s| s.matched).max().unwrap_or(0);
        let split = self.held.len() - keep.min(self.held.len());
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

    #[test]
    fn a_longer_stop_string_that_starts_earlier_in_the_same_text_wins() {
        let mut stops = StopMatcher::new(vec!["bc".into(), "abcd".into()]);
        let matched = stops.push("xabcd");
        assert_eq!(matched.emit, "x");
        assert!(matched.stopped);
    }

    #[test]
    fn overlapping_partial_matches_fall_back_without_losing_text() {
        // "aab" after "aaa": the automaton falls back instead of restarting.
        let mut stops = StopMatcher::new(vec!["aab".into()]);
        assert_eq!(stops.push("aa").emit, "");
        assert_eq!(stops.push("a").emit, "a");
        // "aaab!": the text before "aab" is the one "a" already sent.
        let matched = stops.push("b!");
        assert_eq!(matched.emit, "");
        assert!(matched.stopped);
    }

    #[test]
    fn a_long_stop_string_costs_nothing_until_it_could_match() {
        let stop = "z".repeat(200);
        let mut stops = StopMatcher::new(vec![stop.clone()]);
        for _ in 0..1000 {
            assert_eq!(stops.push("a").emit, "a");
        }
        assert_eq!(stops.push(&stop[..199]).emit, "");
        assert!(stops.push("z").stopped);
    }
}

//! One choice's text as it is generated: tokens become text without splitting a UTF-8
//! character, and text that might be the start of a stop sequence is held back until it
//! is known not to be one, so a client never sees a stop sequence or part of one.

use hearth_engine::scheduler::TokenLogprobs;
use hearth_models::{IncrementalDecoder, Tokenizer};

/// A token with its log-probabilities, in wire terms.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub text: String,
    /// Where the token's text starts in the choice's generated text (bytes).
    pub offset: usize,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// (text, bytes, logprob), most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What may be sent now.
#[derive(Debug, Default, PartialEq)]
pub struct Release {
    pub text: String,
    /// Log-probabilities of the tokens whose text is now entirely released.
    pub tokens: Vec<TokenInfo>,
    /// A stop sequence was found: the choice is over.
    pub stopped: bool,
}

pub struct ChoiceText {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    /// Text decoded but not yet released.
    held: String,
    /// Tokens not yet released, with the start and end of their text in the choice's
    /// whole text (bytes; `released` of it have been sent).
    held_tokens: Vec<(usize, usize, TokenInfo)>,
    /// Bytes of text released so far.
    released: usize,
    stopped: bool,
    /// Control tokens whose text is kept (a tool-call opener such as `[TOOL_CALLS]`).
    visible: Vec<u32>,
}

fn token_info(tok: &Tokenizer, id: u32, lp: &TokenLogprobs, offset: usize) -> TokenInfo {
    let entry = |id: u32| {
        let bytes = tok.token_bytes(id).to_vec();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (text, bytes) = entry(id);
    TokenInfo {
        text,
        offset,
        bytes,
        logprob: lp.logprob,
        top: lp
            .top
            .iter()
            .map(|&(t, l)| {
                let (s, b) = entry(t);
                (s, b, l)
            })
            .collect(),
    }
}

impl ChoiceText {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::default(),
            stop,
            held: String::new(),
            held_tokens: Vec::new(),
            released: 0,
            stopped: false,
            visible: Vec::new(),
        }
    }

    /// Keeps the text of these control tokens (they are dropped otherwise).
    pub fn keep_control_tokens(&mut self, ids: Vec<u32>) {
        self.visible = ids;
    }

    /// Adds a generated token. Control tokens carry no text unless kept.
    pub fn push(&mut self, tok: &Tokenizer, id: u32, logprobs: Option<&TokenLogprobs>) -> Release {
        if self.stopped {
            return Release {
                stopped: true,
                ..Release::default()
            };
        }
        let start = self.released + self.held.len();
        if !tok.is_control(id) || self.visible.contains(&id) {
            let piece = self.decoder.push(tok.token_bytes(id));
            self.held.push_str(&piece);
        }
        if let Some(lp) = logprobs {
            let end = self.released + self.held.len();
            self.held_tokens
                .push((start, end, token_info(tok, id, lp, start)));
        }
        self.release(false)
    }

    /// The generation ended: everything still held (that is not a stop) goes out.
    pub fn finish(&mut self) -> Release {
        if self.stopped {
            return Release {
                stopped: true,
                ..Release::default()
            };
        }
        let rest = self.decoder.finish();
        self.held.push_str(&rest);
        self.release(true)
    }

    fn release(&mut self, at_end: bool) -> Release {
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        let (cut, stopped) = match found {
            Some(at) => (at, true),
            None if at_end => (self.held.len(), false),
            None => (self.held.len() - self.unsafe_suffix(), false),
        };
        self.stopped = stopped;
        let text = self.held[..cut].to_owned();
        let cut_at = self.released + cut;
        let done = if stopped {
            // Every token whose text begins before the stop sequence, and text-less
            // tokens before it.
            self.held_tokens
                .iter()
                .take_while(|(start, end, _)| *start < cut_at || *end <= cut_at)
                .count()
        } else {
            self.held_tokens
                .iter()
                .take_while(|(_, end, _)| *end <= cut_at)
                .count()
        };
        let tokens = self.held_tokens.drain(..done).map(|(_, _, t)| t).collect();
        self.released = cut_at;
        if stopped {
            self.held.clear();
            self.held_tokens.clear();
        } else {
            self.held.drain(..cut);
        }
        Release {
            text,
            tokens,
            stopped,
        }
    }

    /// Length of the longest suffix of `held` that begins some stop sequence.
    fn unsafe_suffix(&self) -> usize {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let h = &self.held;
        (1..longest.min(h.len() + 1))
            .rev()
            .filter(|&n| h.is_char_boundary(h.len() - n))
            .find(|&n| {
                let tail = &h[h.len() - n..];
                self.stop.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

/// Fuzzing aid: feeds `pieces` as successive token texts and checks the contract: no
/// stop sequence (or part of one) is ever released, and without a stop everything is.
#[doc(hidden)]
pub fn check_stop_contract(stop: Vec<String>, pieces: &[String]) {
    let mut c = ChoiceText::new(stop.clone());
    let mut out = String::new();
    let mut stopped = false;
    for p in pieces {
        c.held.push_str(p);
        let r = c.release(false);
        out.push_str(&r.text);
        if r.stopped {
            stopped = true;
            break;
        }
    }
    if !stopped {
        let r = c.release(true);
        out.push_str(&r.text);
        stopped = r.stopped;
    }
    let all: String = pieces.concat();
    for s in &stop {
        assert!(!out.contains(s.as_str()), "released a stop sequence");
    }
    if stopped {
        assert!(
            all.starts_with(&out),
            "released text that was not generated"
        );
    } else {
        assert_eq!(out, all, "lost text");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds text pieces directly (bypassing the tokenizer).
    fn feed(c: &mut ChoiceText, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            c.held.push_str(p);
            let r = c.release(false);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        let r = c.release(true);
        out.push_str(&r.text);
        (out, r.stopped)
    }

    #[test]
    fn stop_sequences_are_found_across_pieces_and_never_sent() {
        let mut c = ChoiceText::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(
            feed(&mut c, &["Hello E", "N", "D world"]),
            ("Hello ".into(), true)
        );
        let mut c = ChoiceText::new(vec!["END".into()]);
        assert_eq!(feed(&mut c, &["an E", "ND"]), ("an ".into(), true));
        // A near miss is released once it cannot be a stop any more.
        let mut c = ChoiceText::new(vec!["END".into()]);
        let mut partial = String::new();
        for p in ["an E", "N", "x"] {
            c.held.push_str(p);
            let r = c.release(false);
            partial.push_str(&r.text);
            if p != "x" {
                assert_eq!(partial, "an ", "a possible stop is held back");
            }
        }
        assert_eq!(partial, "an ENx");
        // Nothing held at the end is lost.
        let mut c = ChoiceText::new(vec!["END".into()]);
        assert_eq!(feed(&mut c, &["tail E"]), ("tail E".into(), false));
        // Multi-byte text next to a stop.
        let mut c = ChoiceText::new(vec!["☃☃".into()]);
        assert_eq!(feed(&mut c, &["é☃", "x☃", "☃y"]), ("é☃x".into(), true));
    }

    #[test]
    fn logprob_tokens_carry_their_offsets_and_reach_the_stop() {
        let mut c = ChoiceText::new(vec!["STOP".into()]);
        let mut got = Vec::new();
        for piece in ["ab", "c S", "TOP", "x"] {
            let start = c.released + c.held.len();
            c.held.push_str(piece);
            let info = TokenInfo {
                text: piece.into(),
                offset: start,
                bytes: piece.as_bytes().to_vec(),
                logprob: -1.0,
                top: Vec::new(),
            };
            c.held_tokens.push((start, c.released + c.held.len(), info));
            let r = c.release(false);
            got.extend(r.tokens.into_iter().map(|t| (t.text, t.offset)));
            if r.stopped {
                break;
            }
        }
        // "c S" straddles the stop: its "c " was sent, so its logprob is too.
        assert_eq!(got, vec![("ab".into(), 0), ("c S".into(), 2)]);
    }
}

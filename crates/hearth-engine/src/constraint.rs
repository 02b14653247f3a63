//! Constrained decoding: a grammar (JSON schema, Lark, regex) decides which tokens may
//! come next, and tokens it forbids are never sampled. Built on `llguidance`: one
//! [`Constraints`] per model holds the token trie; each request gets a [`Constraint`]
//! (an llguidance matcher) that follows its tokens.
//!
//! The scheduler computes a sequence's mask for the next token while the model runs
//! the step that produces that token's logits (the mask depends only on the tokens so
//! far), so masks cost little on the critical path.

use std::sync::Arc;

use hearth_models::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON document valid under this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
    /// A Lark grammar in llguidance's dialect (which also reads GBNF-style `::=` rules
    /// and may embed JSON schemas with `%json { ... }`).
    Lark(String),
    /// The whole output matches this regular expression.
    Regex(String),
}

/// Why a grammar cannot be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// The tokenizer as llguidance sees it: every token's bytes (control tokens as
/// `0xFF` + their text, so grammars can name them but text never matches them) and our
/// own tokenizer for the strings a grammar forces.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        // Valid UTF-8 runs as our tokenizer cuts them (canonical, so llguidance may
        // force tokens); stray bytes greedily.
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).unwrap_or_default()
        })
    }
}

/// Compiles grammars for one model's tokenizer. Building it walks the whole vocabulary
/// once (tens of milliseconds), so models build it on first use.
pub struct Constraints {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for Constraints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraints")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl Constraints {
    /// `vocab`: the model's logits width (may exceed the tokenizer's vocabulary).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self, GrammarError> {
        let n = tokenizer.vocab_size().max(vocab);
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_text(id).unwrap_or("").as_bytes());
                    w
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let eos = tokenizer
            .eos
            .or_else(|| tokenizer.eog_tokens().first().copied())
            .ok_or_else(|| GrammarError("the model has no end-of-sequence token".into()))?;
        let mut info = TokRxInfo::new(n as u32, eos);
        info.tok_bos = tokenizer.bos;
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| GrammarError(format!("cannot prepare constrained decoding: {e}")))?;
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(Self { factory, vocab })
    }

    /// Compiles `grammar`; errors (a bad schema, a grammar that does not parse) come
    /// back as text meant for the client.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(json_layout(schema)),
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(json_layout(&serde_json::json!({
                    "type": "object"
                })))
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| GrammarError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError(e));
        }
        Ok(Constraint { matcher })
    }
}

/// JSON laid out as Python's `json.dumps` does (`{"a": 1, "b": [2, 3]}`), unless the
/// schema sets its own `x-guidance` options. Free whitespace would let a small model
/// emit blanks until `max_tokens`; a fixed layout also makes outputs reproducible.
/// Objects with `properties` allow no other keys unless they say so
/// ([`hearth_models::tools::strict_schema`]).
pub fn json_layout(schema: &serde_json::Value) -> serde_json::Value {
    let mut schema = hearth_models::tools::strict_schema(schema);
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Clone for Constraint {
    /// A fresh copy with its own state (the choices of one request each get one).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

/// The tokens allowed at one position.
pub struct Mask(SimpleVob);

impl Mask {
    pub fn allows(&self, id: u32) -> bool {
        self.0.is_allowed(id)
    }

    /// Sets every forbidden token's logit to minus infinity. Returns false when the
    /// mask allows nothing at all.
    pub fn apply(&self, logits: &mut [f32]) -> bool {
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            if self.0.is_allowed(id as u32) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        any
    }
}

impl Constraint {
    /// The tokens that may come next (the end-of-sequence token when the output may end
    /// here).
    pub fn mask(&mut self) -> Result<Mask, GrammarError> {
        let m = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError(e.to_string()))?;
        Ok(Mask(m))
    }

    /// Advances over a sampled token.
    pub fn commit(&mut self, id: u32) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(id)
            .map_err(|e| GrammarError(e.to_string()))
    }

    /// Tokens the grammar forces next (a fixed key, a closing bracket), already
    /// advanced over; they need no sampling. Empty when nothing is forced.
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.consume_ff_tokens()
    }

    /// The output is complete: the grammar allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output could end here.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

//! Constrained decoding: a grammar (JSON schema, Lark, regex) decides which tokens may
//! come next, and tokens it forbids are never sampled. Built on `llguidance`: one
//! [`Constraints`] per model holds the token trie; each request gets a [`Constraint`]
//! (an llguidance matcher) that follows its tokens.
//!
//! The scheduler computes a sequence's mask for the next token while the model runs
//! the step that produces that token's logits (the mask depends only on the tokens so
//! far), so masks cost little on the critical path.

mod limits;

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
    /// back as text meant for the client. Unbounded: grammars from clients go through
    /// [`Constraints::compile_bounded`].
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
            .map_err(|e| GrammarError(client_message(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError(client_message(&e)));
        }
        Ok(Constraint { matcher })
    }

    /// Compiles a grammar a client sent, within `limits`: its size and nesting are
    /// checked first, then it is compiled, and its first token mask computed (a grammar
    /// whose lexer cannot be built fails here, not in the middle of a generation), on a
    /// thread of its own with a large stack, at most [`COMPILE_SLOTS`] at once, within
    /// the time limit. Waiting (for a slot, for the compiler) holds no thread: a flood
    /// of grammars cannot tie up the threads other requests need. A panic in the
    /// compiler is caught and becomes an error.
    pub async fn compile_bounded(
        self: &Arc<Self>,
        grammar: &Grammar,
        limits: &GrammarLimits,
    ) -> Result<Constraint, CompileError> {
        limits.check(grammar)?;
        let deadline = tokio::time::Instant::now() + limits.timeout;
        let timeout = CompileError::Timeout(limits.timeout);
        let slot = tokio::time::timeout_at(deadline, limits::SLOTS.acquire())
            .await
            .map_err(|_| timeout.clone())?
            .map_err(|_| CompileError::Internal)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (this, grammar) = (self.clone(), grammar.clone());
        std::thread::Builder::new()
            .name("hearth-grammar".into())
            .stack_size(limits::COMPILE_STACK)
            .spawn(move || {
                // The slot is held until the work ends, even when nobody waits any more:
                // abandoned compilations cannot pile up.
                let _slot = slot;
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.compile_checked(&grammar)
                }));
                let result = result.unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!("grammar compilation panicked: {what}");
                    Err(CompileError::Internal)
                });
                let _ = tx.send(result);
            })
            .map_err(|e| {
                tracing::error!("cannot start a grammar thread: {e}");
                CompileError::Internal
            })?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CompileError::Internal),
            Err(_) => Err(timeout),
        }
    }

    /// Compiles and computes the first mask; a grammar the library gives up on is an
    /// error now.
    fn compile_checked(&self, grammar: &Grammar) -> Result<Constraint, CompileError> {
        let mut c = self
            .compile(grammar)
            .map_err(|e| CompileError::Invalid(e.0))?;
        c.mask().map_err(|e| {
            CompileError::Invalid(match e.0.as_str() {
                "NoExtension" | "NoExtensionBias" => {
                    "it matches no output at all (a schema that only refers to itself?)".into()
                }
                m => m.into(),
            })
        })?;
        match c.failure() {
            Some(why) => Err(CompileError::Invalid(why)),
            None => Ok(c),
        }
    }
}

pub use limits::{CompileError, GrammarLimits, COMPILE_SLOTS};

/// A compiler or matcher error as a client may see it: one line, at most 300
/// characters, and nothing of the library's internals (a caught panic's backtrace,
/// source paths, versions) — those stay in the log.
fn client_message(e: &str) -> String {
    let internal = [
        "panicked",
        "backtrace",
        ".rs:",
        "/rustc/",
        "registry/src",
        "RUST_BACKTRACE",
    ];
    if internal.iter().any(|m| e.contains(m)) {
        tracing::warn!("grammar error with internals (not sent to the client): {e}");
        return "the grammar could not be compiled".into();
    }
    let line = e
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut out: String = line.chars().take(300).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
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
            .map_err(|e| GrammarError(client_message(&e.to_string())))?;
        Ok(Mask(m))
    }

    /// Advances over a sampled token.
    pub fn commit(&mut self, id: u32) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(id)
            .map_err(|e| GrammarError(client_message(&e.to_string())))
    }

    /// Tokens the grammar forces next (a fixed key, a closing bracket), already
    /// advanced over; they need no sampling. Empty when nothing is forced.
    pub fn forced(&mut self) -> Vec<u32> {
        self.matcher.consume_ff_tokens()
    }

    /// Why the grammar stopped, when it failed rather than completed: it exceeded a
    /// limit of the library (a lexer too complex, too many parser items) or met an
    /// internal error.
    pub fn failure(&self) -> Option<String> {
        use llguidance::api::StopReason;
        if let Some(e) = self.matcher.get_error() {
            return Some(client_message(&e));
        }
        match self.matcher.stop_reason() {
            StopReason::LexerTooComplex => Some(
                "its lexer is too complex (a regular expression or string pattern that expands too far)".into(),
            ),
            StopReason::ParserTooComplex => {
                Some("it is too complex or ambiguous to parse".into())
            }
            StopReason::InternalError => Some("it could not be compiled".into()),
            _ => None,
        }
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

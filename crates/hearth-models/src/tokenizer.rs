//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata, matching llama.cpp's token ids.
//!
//! Two vocab families are supported, as llama.cpp names them in `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE with ranked merges, split first by the pre-tokenizer regexes
//!   that `tokenizer.ggml.pre` selects (they differ per model family);
//! - `llama`: SentencePiece BPE, where a merge's priority is the score of the merged
//!   piece, spaces become `▁`, a `▁` is prepended, and unknown bytes fall back to
//!   `<0xXX>` tokens.
//!
//! Control and user-defined tokens (`<|im_start|>`, `<s>`, …) are matched in the text
//! before pre-tokenization, as llama.cpp's server does.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::gguf::{GgufError, GgufFile, Value};

/// llama.cpp's token attribute, from `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_id(id: i64) -> Self {
        match id {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// The vocab family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (GPT-2 style).
    Gpt2,
    /// SentencePiece BPE with scores (Llama 1/2, Mistral).
    Spm,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Regex splits per `tokenizer.ggml.pre`, as llama.cpp applies them (in order, each one
/// re-splitting the pieces of the previous).
fn pre_tokenizer_regexes(pre: &str) -> Option<(&'static [&'static str], bool)> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // (regexes, ignore_merges)
    Some(match pre {
        "default" => (
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            (&[LLAMA3], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => (&[QWEN2], false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2], false)
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => (&[GPT2], false),
        "falcon" => (&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"], false),
        _ => return None,
    })
}

/// Names accepted for `tokenizer.ggml.pre`, for error messages.
const SUPPORTED_PRE: &str =
    "default, llama3/llama-bpe, qwen2, smollm/starcoder, gpt-2, falcon (and their aliases)";

/// Chat models end turns with control tokens that the metadata does not always name;
/// llama.cpp recognises these by text too.
fn add_turn_enders(tokens: &[String], types: &[TokenType], eog: &mut Vec<u32>) {
    for (i, (s, t)) in tokens.iter().zip(types).enumerate() {
        if *t == TokenType::Control
            && matches!(
                s.as_str(),
                "<|eot_id|>"
                    | "<|im_end|>"
                    | "<|end|>"
                    | "<end_of_turn>"
                    | "<|endoftext|>"
                    | "<|eom_id|>"
                    | "</s>"
            )
            && !eog.contains(&(i as u32))
        {
            eog.push(i as u32);
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_level_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    out
}

/// A tokenizer plus what the engine needs to know about special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    kind: TokenizerKind,
    tokens: Vec<String>,
    token_types: Vec<TokenType>,
    /// The bytes each token stands for when detokenized (control tokens: their text).
    token_bytes: Vec<Vec<u8>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End-of-generation tokens: eos, eot and other control tokens that end a turn.
    eog: Vec<u32>,
    pub add_bos: bool,
    add_space_prefix: bool,
    /// Matchers over the added tokens, built on first use ([`crate::guard`]).
    added: std::sync::OnceLock<crate::guard::AddedTokens>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn string_array<'a>(f: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, GgufError> {
    let Some(v) = f.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .ok_or_else(|| f.error(format!("metadata `{key}` should be an array of strings")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| f.error(format!("metadata `{key}` should be an array of strings")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn number_array(f: &GgufFile, key: &str, len: usize) -> Result<Option<Vec<f64>>, GgufError> {
    let Some(v) = f.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .ok_or_else(|| f.error(format!("metadata `{key}` should be an array of numbers")))?;
    if arr.len() != len {
        return Err(f.error(format!(
            "metadata `{key}` has {} entries but the vocab has {len} tokens",
            arr.len()
        )));
    }
    arr.iter()
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| f.error(format!("metadata `{key}` should be an array of numbers")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl Tokenizer {
    /// Rebuilds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        let model = f
            .str_key("tokenizer.ggml.model")?
            .ok_or_else(|| f.error("missing metadata key `tokenizer.ggml.model`"))?;
        let kind = match model {
            "gpt2" => TokenizerKind::Gpt2,
            "llama" => TokenizerKind::Spm,
            other => {
                return Err(f
                    .error(format!(
                        "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                    ))
                    .into())
            }
        };
        let tokens: Vec<String> = string_array(f, "tokenizer.ggml.tokens")?
            .ok_or_else(|| f.error("missing metadata key `tokenizer.ggml.tokens`"))?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let n = tokens.len();
        if n == 0 {
            return Err(f.error("`tokenizer.ggml.tokens` is empty").into());
        }
        let token_types: Vec<TokenType> = match number_array(f, "tokenizer.ggml.token_type", n)? {
            Some(v) => v
                .into_iter()
                .map(|t| TokenType::from_id(t as i64))
                .collect(),
            None => vec![TokenType::Normal; n],
        };
        let special = |key: &str| -> Result<Option<u32>, GgufError> {
            match f.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                    _ => Err(f.error(format!(
                        "metadata `{key}` = {v:?} is not a token id below {n}"
                    ))),
                },
            }
        };
        let flag = |key: &str| f.get(key).and_then(Value::as_bool);
        let bos = special("tokenizer.ggml.bos_token_id")?;
        let eos = special("tokenizer.ggml.eos_token_id")?;
        let eot = special("tokenizer.ggml.eot_token_id")?;
        let eom = special("tokenizer.ggml.eom_token_id")?;
        let unk = special("tokenizer.ggml.unknown_token_id")?;

        let (inner, add_bos_default, add_space_prefix) = match kind {
            TokenizerKind::Gpt2 => {
                let pre = f.str_key("tokenizer.ggml.pre")?.unwrap_or("default");
                let (regexes, ignore_merges) = pre_tokenizer_regexes(pre).ok_or_else(|| {
                    f.error(format!(
                        "unsupported pre-tokenizer `tokenizer.ggml.pre` = `{pre}` (supported: {SUPPORTED_PRE})"
                    ))
                })?;
                let merges = string_array(f, "tokenizer.ggml.merges")?
                    .ok_or_else(|| f.error("missing metadata key `tokenizer.ggml.merges`"))?;
                let tok = build_gpt2(&tokens, &merges, regexes, ignore_merges)
                    .map_err(|e| f.error(format!("cannot build the BPE tokenizer: {e}")))?;
                // Of the BPE families, only Llama 3's adds BOS by default (llama.cpp).
                (tok, ignore_merges, false)
            }
            TokenizerKind::Spm => {
                let scores = number_array(f, "tokenizer.ggml.scores", n)?
                    .ok_or_else(|| f.error("missing metadata key `tokenizer.ggml.scores`"))?;
                let space = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let tok = build_spm(&tokens, &scores, &token_types, unk, space).map_err(|e| {
                    f.error(format!("cannot build the SentencePiece tokenizer: {e}"))
                })?;
                (tok, true, space)
            }
        };
        let mut inner = inner;
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, t)| {
                matches!(
                    t,
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .filter(|(s, _)| !s.is_empty())
            .map(|(s, t)| {
                AddedToken::from(s.clone(), *t != TokenType::UserDefined).normalized(false)
            })
            .collect();
        inner.add_special_tokens(&added);

        let token_bytes = token_byte_table(kind, &tokens, &token_types);

        let mut eog: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        add_turn_enders(&tokens, &token_types, &mut eog);

        Ok(Self {
            inner,
            kind,
            tokens,
            token_types,
            token_bytes,
            bos,
            eos,
            eog,
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default)
                && bos.is_some(),
            add_space_prefix,
            added: Default::default(),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`; `config` is `tokenizer_config.json` (BOS,
    /// EOS, `add_bos_token`) and `eos_ids` the ids `generation_config.json` says end a
    /// generation. Errors are plain messages; the caller names the file.
    pub fn from_hf(
        path: &std::path::Path,
        config: &serde_json::Value,
        eos_ids: &[u32],
    ) -> Result<Self, String> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| e.to_string())?;
        // Byte-level BPE (GPT-2, Llama 3, Qwen) or SentencePiece-style BPE (Llama 2,
        // Mistral): the decoder (alone or inside a sequence) says which.
        let decoder = serde_json::to_string(&inner.get_decoder()).unwrap_or_default();
        let kind = if decoder.contains("ByteLevel") {
            TokenizerKind::Gpt2
        } else {
            TokenizerKind::Spm
        };
        let vocab = inner.get_vocab(true);
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if n == 0 {
            return Err("the vocabulary is empty".into());
        }
        let mut tokens = vec![String::new(); n];
        for (t, &i) in &vocab {
            tokens[i as usize] = t.clone();
        }
        let special: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&i, _)| i)
            .collect();
        let token_types: Vec<TokenType> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if special.contains(&(i as u32)) {
                    TokenType::Control
                } else if kind == TokenizerKind::Spm
                    && t.len() == 6
                    && t.starts_with("<0x")
                    && t.ends_with('>')
                {
                    TokenType::Byte
                } else {
                    TokenType::Normal
                }
            })
            .collect();
        let named = |k: &str| -> Option<u32> {
            let v = &config[k];
            let text = v.as_str().or(v["content"].as_str())?;
            inner.token_to_id(text)
        };
        let bos = named("bos_token");
        let eos = named("eos_token").or(eos_ids.first().copied());
        let add_bos = match config["add_bos_token"].as_bool() {
            Some(b) => b,
            // Otherwise as the post-processor does it.
            None => inner
                .encode("a", true)
                .ok()
                .and_then(|e| e.get_ids().first().copied())
                .is_some_and(|first| Some(first) == bos),
        } && bos.is_some();
        let mut eog: Vec<u32> = eos.into_iter().collect();
        for &id in eos_ids {
            if (id as usize) < n && !eog.contains(&id) {
                eog.push(id);
            }
        }
        add_turn_enders(&tokens, &token_types, &mut eog);
        let token_bytes = token_byte_table(kind, &tokens, &token_types);
        Ok(Self {
            inner,
            kind,
            tokens,
            token_types,
            token_bytes,
            bos,
            eos,
            eog,
            add_bos,
            add_space_prefix: kind == TokenizerKind::Spm,
            added: Default::default(),
        })
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The underlying `tokenizers` object (for export or inspection).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The added tokens as matchers, for [`crate::guard::PromptGuard`].
    pub(crate) fn added_tokens(&self) -> &crate::guard::AddedTokens {
        self.added
            .get_or_init(|| crate::guard::AddedTokens::new(&self.inner))
    }

    /// Token ids for `text`, special tokens in the text recognised, with the model's
    /// BOS prepended when `add_special` and the model asks for one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The bytes a token stands for; empty for ids outside the vocab.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The token's text as stored in the vocab.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Whether the token is a control token (never shown as text by default).
    pub fn is_control(&self, id: u32) -> bool {
        matches!(
            self.token_types.get(id as usize),
            Some(TokenType::Control | TokenType::Unknown)
        )
    }

    /// Whether generation ends at this token.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    /// Decodes a whole sequence to text. Control tokens are dropped when `skip_special`.
    /// Invalid UTF-8 (a sequence cut inside a character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_control(id) {
                continue;
            }
            bytes.extend_from_slice(self.token_bytes(id));
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.kind == TokenizerKind::Spm && self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }
}

/// The bytes of every token, for detokenization.
fn token_byte_table(kind: TokenizerKind, tokens: &[String], types: &[TokenType]) -> Vec<Vec<u8>> {
    let unicode_to_byte: HashMap<char, u8> = byte_level_alphabet()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    tokens
        .iter()
        .zip(types)
        .map(|(s, t)| token_bytes(kind, s, *t, &unicode_to_byte))
        .collect()
}

fn token_bytes(
    kind: TokenizerKind,
    s: &str,
    t: TokenType,
    unicode_to_byte: &HashMap<char, u8>,
) -> Vec<u8> {
    if matches!(
        t,
        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
    ) {
        return s.as_bytes().to_vec();
    }
    match kind {
        TokenizerKind::Gpt2 => s
            .chars()
            .map(|c| unicode_to_byte.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| s.as_bytes().to_vec()),
        TokenizerKind::Spm => {
            if t == TokenType::Byte {
                if let Some(hex) = s.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    if let Ok(b) = u8::from_str_radix(hex, 16) {
                        return vec![b];
                    }
                }
            }
            s.replace('\u{2581}', " ").into_bytes()
        }
    }
}

fn vocab_map(tokens: &[String]) -> tokenizers::models::bpe::Vocab {
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        // On duplicates the first id wins, as in llama.cpp's text_to_token map.
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    vocab
}

fn build_gpt2(
    tokens: &[String],
    merges: &[&str],
    regexes: &[&str],
    ignore_merges: bool,
) -> Result<tokenizers::Tokenizer, String> {
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("merge `{m}` has no space"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut pre: Vec<PreTokenizerWrapper> = Vec::new();
    for r in regexes {
        let split = Split::new(
            SplitPattern::Regex((*r).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("regex {r}: {e}"))?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(PreSequence::new(pre)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// SentencePiece BPE expressed as ranked merges: every way to split a piece into two
/// pieces of the vocab is a merge, ranked by the merged piece's score (higher first).
fn build_spm(
    tokens: &[String],
    scores: &[f64],
    types: &[TokenType],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, String> {
    let vocab = vocab_map(tokens);
    let mut order: Vec<usize> = (0..tokens.len())
        .filter(|&i| types[i] == TokenType::Normal || types[i] == TokenType::UserDefined)
        .collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for i in order {
        let piece = &tokens[i];
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_owned(), r.to_owned()));
            }
        }
    }
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(tokens[u as usize].clone());
    }
    let bpe = builder.build().map_err(|e| e.to_string())?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norms.push(Prepend::new("\u{2581}".into()).into());
    }
    norms.push(
        Replace::new(" ", "\u{2581}")
            .map_err(|e| e.to_string())?
            .into(),
    );
    tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)));
    let decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            Replace::new("\u{2581}", " ").map_err(|e| e.to_string())?,
        ),
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', usize::from(add_space_prefix), 0).into(),
    ];
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let a = byte_level_alphabet();
        let set: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(a[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(a[b'\n' as usize], '\u{10a}'); // 'Ċ'
        assert_eq!(a[b'A' as usize], 'A');
    }

    fn spm() -> Tokenizer {
        // A tiny SentencePiece vocab: bytes, pieces with scores, control tokens.
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
        for (p, s) in [
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("he", -4.0),
            ("hell", -5.0),
            ("hello", -6.0),
            ("\u{2581}hello", -7.0),
            ("\u{2581}w", -8.0),
            ("or", -9.0),
        ] {
            tokens.push(p.into());
            types.push(TokenType::Normal);
            scores.push(s);
        }
        let inner = build_spm(&tokens, &scores, &types, Some(0), true).unwrap();
        let token_bytes = token_byte_table(TokenizerKind::Spm, &tokens, &types);
        let mut inner = inner;
        inner.add_special_tokens(&[
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ]);
        Tokenizer {
            inner,
            kind: TokenizerKind::Spm,
            tokens,
            token_types: types,
            token_bytes,
            bos: Some(1),
            eos: Some(2),
            eog: vec![2],
            add_bos: true,
            add_space_prefix: true,
            added: Default::default(),
        }
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let t = spm();
        let ids = t.encode("hello world!", true).unwrap();
        let pieces: Vec<&str> = ids.iter().map(|&i| t.token_text(i).unwrap()).collect();
        assert_eq!(
            pieces,
            [
                "<s>",
                "\u{2581}hello",
                "\u{2581}w",
                "or",
                "l",
                "d",
                "<0x21>"
            ]
        );
        assert_eq!(t.decode(&ids, true), "hello world!");
        // A special token in the text is one id.
        let ids = t.encode("hello</s>", false).unwrap();
        assert_eq!(ids.last(), Some(&2));
    }

    #[test]
    fn every_supported_pre_tokenizer_regex_compiles() {
        for pre in ["default", "llama-bpe", "qwen2", "smollm", "gpt-2", "falcon"] {
            let (regexes, _) = pre_tokenizer_regexes(pre).unwrap();
            let tokens = vec!["a".to_string()];
            build_gpt2(&tokens, &[], regexes, false).unwrap();
        }
        assert!(pre_tokenizer_regexes("no-such-pre").is_none());
    }
}

/// Turns token bytes into text as they arrive, never splitting a UTF-8 character:
/// an incomplete character is held back until its last byte comes.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// Adds bytes and returns the text that is now complete. Invalid sequences become
    /// U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` was just checked.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held back, as text (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod incremental_tests {
    use super::IncrementalDecoder;

    #[test]
    fn holds_back_partial_characters() {
        let mut d = IncrementalDecoder::default();
        let snow = "☃".as_bytes(); // 3 bytes
        assert_eq!(d.push(b"a"), "a");
        assert_eq!(d.push(&snow[..1]), "");
        assert_eq!(d.push(&snow[1..2]), "");
        assert_eq!(d.push(&snow[2..]), "☃");
        assert_eq!(d.push(&[0xff, b'b']), "\u{FFFD}b");
        assert_eq!(d.push(&snow[..2]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}

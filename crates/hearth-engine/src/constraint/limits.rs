//! What a client's grammar may cost to compile. A JSON schema whose `$ref`s chain a few
//! hundred levels deep, or a Lark grammar of a thousand chained rules, makes the
//! compiler recurse as deep as the chain is long (the default 2 MiB thread stack
//! overflowed and aborted the process); a grammar of megabytes takes minutes. So: the
//! source's size and nesting are checked before the compiler sees it; compilation runs on
//! a thread with a stack far deeper than any grammar within the size limit can reach
//! (measured: see the tests), a few at a time, within a time limit.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::Grammar;

/// Stack of a compiling thread. Reserved address space: pages are touched only as deep
/// as the compiler goes.
pub const COMPILE_STACK: usize = 256 << 20;

/// Grammars compiled at once, all requests together; more wait (within their time
/// limit). Bounds the CPU and memory abusive grammars can take.
pub const COMPILE_SLOTS: usize = 2;

/// Bounds on one grammar.
#[derive(Clone, Debug, PartialEq)]
pub struct GrammarLimits {
    /// Bytes of source: a Lark grammar or regex as given, a JSON schema as compact JSON.
    pub max_bytes: usize,
    /// Nesting: a schema's subschemas within subschemas (`$ref`s followed), a Lark
    /// grammar's rules referring to rules.
    pub max_depth: usize,
    /// Waiting for a slot, compiling and computing the first token mask together.
    pub timeout: Duration,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 10,
            max_depth: 128,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a client's grammar was not compiled.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CompileError {
    /// The grammar is wrong (does not parse, an unsupported schema feature, a lexer the
    /// library refuses to build).
    #[error("{0}")]
    Invalid(String),
    #[error("the grammar is {bytes} bytes long; this server accepts at most {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the grammar nests more than {limit} levels deep (subschemas or `$ref`s within each other, or rules referring to rules)")]
    TooDeep { limit: usize },
    #[error("compiling the grammar took longer than the {} s this server allows", .0.as_secs_f64())]
    Timeout(Duration),
    /// The compiler failed in a way that is not the client's to see (logged).
    #[error("the grammar could not be compiled")]
    Internal,
}

impl GrammarLimits {
    /// Checks a grammar's size and nesting (cheap: no compilation).
    pub fn check(&self, grammar: &Grammar) -> Result<(), CompileError> {
        check(grammar, self)
    }
}

fn check(grammar: &Grammar, limits: &GrammarLimits) -> Result<(), CompileError> {
    let bytes = match grammar {
        Grammar::JsonSchema(v) => json_len(v),
        Grammar::JsonObject => 0,
        Grammar::Lark(s) | Grammar::Regex(s) => s.len(),
    };
    if bytes > limits.max_bytes {
        return Err(CompileError::TooLarge {
            bytes,
            limit: limits.max_bytes,
        });
    }
    let deep = CompileError::TooDeep {
        limit: limits.max_depth,
    };
    let found = match grammar {
        Grammar::JsonSchema(v) => schema_depth(v, limits.max_depth),
        Grammar::Lark(s) => lark_depth(s, limits.max_depth),
        Grammar::JsonObject | Grammar::Regex(_) => Ok(0),
    };
    match found {
        Ok(_) => Ok(()),
        Err(DepthError::Deep) => Err(deep),
        Err(DepthError::Ref(r)) => Err(CompileError::Invalid(format!(
            "the `$ref` {:?} is not a JSON pointer into this schema (`#`, `#/$defs/…`); only those can be followed",
            r.chars().take(64).collect::<String>()
        ))),
    }
}

/// Why a grammar's nesting was not accepted.
#[derive(Debug, PartialEq)]
pub(crate) enum DepthError {
    /// Deeper than the limit.
    Deep,
    /// A `$ref` that is not a JSON pointer into the schema (an anchor, an `$id`, another
    /// document): its depth cannot be known, so it is refused.
    Ref(String),
}

/// Length of `v` as compact JSON.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Keywords whose value is one subschema, and those whose value holds several.
const ONE: &[&str] = &[
    "additionalProperties",
    "items",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
];
const MANY: &[&str] = &[
    "properties",
    "patternProperties",
    "dependentSchemas",
    "anyOf",
    "oneOf",
    "allOf",
    "prefixItems",
];

/// The deepest chain of subschemas in `root`, `$ref`s (local ones: `#…`) followed; a
/// reference back into its own chain (a recursive schema) ends the chain there. `Err`
/// when deeper than `limit` (the walk stops there, so it recurses at most `limit`
/// levels itself).
pub(crate) fn schema_depth(root: &Value, limit: usize) -> Result<usize, DepthError> {
    struct Walk<'a> {
        root: &'a Value,
        limit: usize,
        /// Depth below each `$ref` target already walked.
        memo: HashMap<*const Value, usize>,
        open: Vec<*const Value>,
    }
    impl<'a> Walk<'a> {
        fn node(&mut self, v: &'a Value, level: usize) -> Result<usize, DepthError> {
            if level >= self.limit {
                return Err(DepthError::Deep);
            }
            let Value::Object(map) = v else {
                // `items: [..]` (old tuple form) holds schemas too.
                if let Value::Array(items) = v {
                    let mut most = 0;
                    for i in items {
                        most = most.max(self.node(i, level)?);
                    }
                    return Ok(most);
                }
                return Ok(0);
            };
            let mut most = 0;
            for (k, child) in map {
                let below = if ONE.contains(&k.as_str()) {
                    self.node(child, level + 1)?
                } else if MANY.contains(&k.as_str()) {
                    let mut m = 0;
                    let children: Vec<&Value> = match child {
                        Value::Object(o) => o.values().collect(),
                        Value::Array(a) => a.iter().collect(),
                        _ => Vec::new(),
                    };
                    for c in children {
                        m = m.max(self.node(c, level + 1)?);
                    }
                    m
                } else if k == "$ref" {
                    match child.as_str() {
                        Some(r) => match self.resolve(r) {
                            Some(target) => self.target(target, level + 1)?,
                            None => return Err(DepthError::Ref(r.to_owned())),
                        },
                        None => 0,
                    }
                } else {
                    0
                };
                most = most.max(below);
            }
            Ok(most + 1)
        }

        fn target(&mut self, t: &'a Value, level: usize) -> Result<usize, DepthError> {
            let key = t as *const Value;
            if self.open.contains(&key) {
                return Ok(0); // recursion: compiled as a rule that refers to itself
            }
            if let Some(&d) = self.memo.get(&key) {
                if level + d > self.limit {
                    return Err(DepthError::Deep);
                }
                return Ok(d);
            }
            self.open.push(key);
            let d = self.node(t, level);
            self.open.pop();
            let d = d?;
            self.memo.insert(key, d);
            Ok(d)
        }

        /// A `#…` JSON pointer (percent-encoded, as in a URI fragment) into the root.
        fn resolve(&self, r: &str) -> Option<&'a Value> {
            let pointer = percent_decode(r.strip_prefix('#')?)?;
            if pointer.is_empty() {
                return Some(self.root);
            }
            self.root.pointer(&pointer)
        }
    }
    let mut w = Walk {
        root,
        limit,
        memo: HashMap::new(),
        open: vec![root as *const Value],
    };
    w.node(root, 0)
}

/// `%XX` escapes decoded; `None` when they do not make UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The deepest chain of rules referring to rules in a Lark grammar (llguidance's
/// dialect, GBNF-style `::=` rules too), and of any JSON schema embedded with `%json`.
/// A rule that refers back into its own chain ends the chain there. `Err` once deeper
/// than `limit`.
pub(crate) fn lark_depth(src: &str, limit: usize) -> Result<usize, DepthError> {
    let mut rules: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut current: Option<&str> = None;
    let mut embedded = 0;
    let b = src.as_bytes();
    let mut i = 0;
    let mut line_start = true;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line_start = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'"' | b'\'' => {
                // A string literal (`"…"i` too): skip to its closing quote.
                i += 1;
                while i < b.len() && b[i] != c && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'?' | b'!' if line_start => {
                // `?rule:` (inlined) and `!rule:` (keeps tokens).
                i += 1;
                continue;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' => {
                // A regular expression.
                i += 1;
                while i < b.len() && b[i] != b'/' && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'%' if src[i..].starts_with("%json") => {
                // An embedded schema: its own depth counts.
                let rest = &src[i + 5..];
                let start = rest.find('{').unwrap_or(rest.len());
                let mut values =
                    serde_json::Deserializer::from_str(&rest[start..]).into_iter::<Value>();
                match values.next() {
                    Some(Ok(v)) => {
                        embedded = embedded.max(schema_depth(&v, limit)?);
                        i += 5 + start + values.byte_offset();
                    }
                    _ => i += 5,
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let s = i;
                // Names as llguidance's lexer reads them: hyphens too.
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-')
                {
                    i += 1;
                }
                let name = &src[s..i];
                // A definition: a name at the start of a line, then `:` or `::=`; a
                // parameter list `{…}` or attributes `[…]`, and a priority `.N`, may
                // come between.
                let mut j = i;
                if line_start || s == 0 {
                    if let Some(&open @ (b'{' | b'[')) = b.get(j) {
                        let close = if open == b'{' { b'}' } else { b']' };
                        let mut nest = 0usize;
                        while j < b.len() {
                            if b[j] == open {
                                nest += 1;
                            } else if b[j] == close {
                                nest -= 1;
                                if nest == 0 {
                                    j += 1;
                                    break;
                                }
                            }
                            j += 1;
                        }
                    }
                    if b.get(j) == Some(&b'.') {
                        j += 1;
                        while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'-') {
                            j += 1;
                        }
                    }
                    while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
                        j += 1;
                    }
                    if b.get(j) == Some(&b':') {
                        current = Some(name);
                        if !rules.contains_key(name) {
                            order.push(name);
                        }
                        rules.entry(name).or_default();
                        i = j + 1;
                        if src[i..].starts_with(":=") {
                            i += 2;
                        }
                        line_start = false;
                        continue;
                    }
                }
                if let Some(r) = current {
                    rules.entry(r).or_default().push(name);
                }
            }
            _ => i += 1,
        }
        line_start = false;
    }
    fn depth<'a>(
        r: &'a str,
        level: usize,
        limit: usize,
        rules: &HashMap<&'a str, Vec<&'a str>>,
        memo: &mut HashMap<&'a str, usize>,
        open: &mut Vec<&'a str>,
    ) -> Result<usize, DepthError> {
        if level >= limit {
            return Err(DepthError::Deep);
        }
        if open.contains(&r) {
            return Ok(0);
        }
        if let Some(&d) = memo.get(r) {
            return if level + d > limit {
                Err(DepthError::Deep)
            } else {
                Ok(d)
            };
        }
        let Some(refs) = rules.get(r) else {
            return Ok(0); // a terminal or an unknown name: the compiler says
        };
        open.push(r);
        let mut most = 0;
        for &x in refs {
            match depth(x, level + 1, limit, rules, memo, open) {
                Ok(d) => most = most.max(d),
                Err(e) => {
                    open.pop();
                    return Err(e);
                }
            }
        }
        open.pop();
        memo.insert(r, most + 1);
        Ok(most + 1)
    }
    let mut memo = HashMap::new();
    let mut most = embedded;
    for r in order {
        let d = depth(r, 0, limit, &rules, &mut memo, &mut Vec::new())?;
        most = most.max(d + embedded);
        if most > limit {
            return Err(DepthError::Deep);
        }
    }
    Ok(most)
}

/// The compiler slots, all requests together.
pub(super) static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(COMPILE_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The attack of issue 23: `lN = anyOf[$ref lN-1]`, root `$ref l(n-1)`.
    pub(crate) fn ref_chain(n: usize) -> Value {
        let mut defs = serde_json::Map::new();
        defs.insert("l0".into(), json!({"type": "integer"}));
        for i in 1..n {
            defs.insert(
                format!("l{i}"),
                json!({"anyOf": [{"$ref": format!("#/$defs/l{}", i - 1)}]}),
            );
        }
        json!({"$defs": defs, "$ref": format!("#/$defs/l{}", n - 1)})
    }

    pub(crate) fn rule_chain(n: usize) -> String {
        let mut s = String::from("start: r0\n");
        for i in 0..n {
            s.push_str(&format!("r{i}: r{}\n", i + 1));
        }
        s + &format!("r{n}: \"x\"\n")
    }

    #[test]
    fn schema_depth_follows_refs_and_stops_at_recursion() {
        assert_eq!(schema_depth(&json!({"type": "integer"}), 10), Ok(1));
        let nested = json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}});
        assert_eq!(schema_depth(&nested, 10), Ok(3));
        // Each level of the chain is an anyOf and a $ref.
        assert_eq!(schema_depth(&ref_chain(10), 100), Ok(20));
        assert_eq!(schema_depth(&ref_chain(300), 128), Err(DepthError::Deep));
        // Recursive schemas are fine: a tree, a self-reference.
        let tree = json!({"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"});
        assert_eq!(schema_depth(&tree, 10), Ok(4));
        assert_eq!(schema_depth(&json!({"$ref": "#"}), 10), Ok(1));
        // Percent-encoded pointers are followed; refs that are not pointers refused.
        let encoded = serde_json::to_string(&ref_chain(300))
            .unwrap()
            .replace("#/$defs/", "#/%24defs/");
        let encoded: Value = serde_json::from_str(&encoded).unwrap();
        assert_eq!(schema_depth(&encoded, 128), Err(DepthError::Deep));
        for r in ["#a5", "urn:x", "other.json#/a", "#/%zz", "#/$defs/missing"] {
            let v = json!({"$defs": {"a": {"type": "string"}}, "$ref": r});
            assert_eq!(schema_depth(&v, 10), Err(DepthError::Ref(r.into())), "{r}");
        }
        // A shared target reached deep down counts from where it is reached.
        let shared = json!({"$defs": {"d": {"properties": {"x": {"items": {"type": "string"}}}}}, "properties": {"a": {"$ref": "#/$defs/d"}, "b": {"properties": {"c": {"$ref": "#/$defs/d"}}}}});
        assert_eq!(schema_depth(&shared, 100), Ok(6));
        assert_eq!(schema_depth(&shared, 6), Ok(6));
        assert_eq!(schema_depth(&shared, 5), Err(DepthError::Deep));
    }

    #[test]
    fn lark_depth_counts_rule_chains() {
        assert_eq!(lark_depth("start: \"a\" | \"b\"", 10), Ok(1));
        assert_eq!(lark_depth(&rule_chain(5), 100), Ok(7));
        assert_eq!(lark_depth(&rule_chain(1000), 128), Err(DepthError::Deep));
        // Recursion, comments, strings and regexes that look like rules.
        let g =
            "// r: fake\nstart: expr\nexpr: expr \"+\" term | term\nterm: /[0-9]+/ | \"x: y\"\n";
        assert_eq!(lark_depth(g, 10), Ok(3));
        // GBNF-style rules.
        assert_eq!(lark_depth("root ::= a\na ::= \"x\"", 10), Ok(2));
        // Names with hyphens, rules with attributes or parameters, `#` comments.
        let hyphens: String = (0..15_000)
            .map(|i| format!("a-{i}: a-{}\n", i + 1))
            .collect();
        assert!(hyphens.len() <= 256 << 10);
        assert_eq!(
            lark_depth(&format!("start: a-0\n{hyphens}"), 128),
            Err(DepthError::Deep)
        );
        let g = "start: b # c: d\nb[stop=\"x\"]: c\nc{x}: \"y\"\nd: e\n";
        assert_eq!(lark_depth(g, 10), Ok(3));
        // An embedded schema counts.
        let emb = format!("start: %json {}\n", ref_chain(300));
        assert_eq!(lark_depth(&emb, 128), Err(DepthError::Deep));
        let emb = format!("start: %json {}\n", ref_chain(3));
        assert_eq!(lark_depth(&emb, 128), Ok(7));
    }

    #[test]
    fn slots_bound_concurrent_work() {
        let held: Vec<_> = (0..COMPILE_SLOTS)
            .map(|_| SLOTS.try_acquire().unwrap())
            .collect();
        assert!(SLOTS.try_acquire().is_err());
        drop(held);
        assert!(SLOTS.try_acquire().is_ok());
    }

    #[test]
    fn limits_refuse_what_is_too_big_or_deep() {
        let l = GrammarLimits::default();
        let big = Grammar::Lark("x".repeat(l.max_bytes + 1));
        assert!(matches!(
            check(&big, &l),
            Err(CompileError::TooLarge { .. })
        ));
        let deep = Grammar::JsonSchema(ref_chain(300));
        assert_eq!(check(&deep, &l), Err(CompileError::TooDeep { limit: 128 }));
        let deep = Grammar::Lark(rule_chain(1000));
        assert_eq!(check(&deep, &l), Err(CompileError::TooDeep { limit: 128 }));
        assert_eq!(check(&Grammar::JsonSchema(ref_chain(20)), &l), Ok(()));
    }
}

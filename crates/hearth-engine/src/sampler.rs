//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, and
//! a seeded random draw (same seed and inputs, same tokens).
//!
//! Order, as vLLM applies it: logit bias → repetition penalty (llama.cpp style, divides
//! positive logits) → frequency/presence penalties (OpenAI style) → temperature →
//! top-k → top-p → min-p → draw. Temperature 0 is greedy (argmax after penalties).

use std::collections::HashMap;

/// How to sample. Defaults are greedy with no penalties.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at (0 = all).
    pub penalty_last_n: usize,
    /// Whether the prompt counts for the penalties (llama.cpp) or only generated tokens
    /// do (OpenAI). Used by the scheduler, which knows where the prompt ends.
    pub penalize_prompt: bool,
    /// Added to the logits of these tokens before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            penalize_prompt: true,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible everywhere.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Per-sequence sampling state.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `history` is every token of the sequence so far (prompt and
    /// generated); penalties look at its last `penalty_last_n`.
    ///
    /// Whole-vocabulary passes are vector loops (the maximum, the weights `exp(x − max)`
    /// of `x = logit / T`, their sums) over a buffer kept on this thread, and top-p sorts
    /// only as many of the most likely tokens as it needs: a scheduler samples every
    /// sequence of a step one after another, while the compute team waits.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        let p = &self.params;
        if p.is_greedy() {
            return argmax(logits);
        }
        let t = p.temperature;
        let max_logit = hearth_kernels::math::max_above_neg_inf(logits);
        // Only candidates that can survive min-p are kept: p_i >= min_p * p_max means
        // l_i >= l_max + T ln(min_p). (Cheap, and it spares sorting the whole vocabulary.)
        let floor = if p.min_p > 0.0 {
            max_logit + t * p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        // A candidate is a logit that is not NaN, above −∞ (or +∞) and at least `floor`.
        let ok = |l: f32| l > f32::NEG_INFINITY && l >= floor;
        if !ok(max_logit) {
            return argmax(logits);
        }
        let max = max_logit / t;
        if !max.is_finite() {
            // A +∞ logit, or a temperature so small that the top logit over it overflows:
            // infinitely more likely than the rest, the first of them (greedy).
            return argmax(logits);
        }
        SCRATCH.with(|scratch| {
            let Scratch { weights: w, cand } = &mut *scratch.borrow_mut();
            // Each token's weight, 0 for those that are no candidate.
            w.clear();
            w.extend(
                logits
                    .iter()
                    .map(|&l| if ok(l) { l / t } else { f32::NEG_INFINITY }),
            );
            hearth_kernels::math::exp_below(w, max);
            if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
                // Plain temperature: draw from the whole distribution, no order needed.
                return draw(w, self.rng.next_f64());
            }
            // Most likely first; the lower id first among equals.
            let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            let weight = |c: &(u32, f32)| w[c.0 as usize] as f64;
            // Every candidate's weight (the others weigh 0).
            let all = sum_f64(w);
            // The candidates with x >= max − depth, in order: the most likely tokens, a
            // prefix of the whole order. The depth grows until they hold what top-k and
            // top-p take (a top-p nucleus is rarely past e^−8 of the top token's weight),
            // so a vocabulary is filtered, not sorted. Min-p alone takes every candidate
            // (its floor has already cut them to the few it can keep).
            let mut depth = if p.top_k == 0 && p.top_p >= 1.0 {
                f32::INFINITY
            } else {
                8.0
            };
            let (probs, mut keep) = loop {
                let tau = max - depth;
                cand.clear();
                cand.extend(logits.iter().enumerate().filter_map(|(i, &l)| {
                    let x = l / t;
                    (ok(l) && x >= tau).then_some((i as u32, x))
                }));
                let deepest = depth == f32::INFINITY;
                depth = if depth < 24.0 {
                    3.0 * depth
                } else {
                    f32::INFINITY
                };
                let k = p.top_k;
                if k > cand.len() && !deepest {
                    continue; // fewer than top-k so far
                }
                let sum = if k > 0 {
                    // The top k (select them, then sort only those) are the distribution.
                    if k < cand.len() {
                        cand.select_nth_unstable_by(k - 1, order);
                        cand.truncate(k);
                    }
                    cand.iter().map(weight).sum()
                } else {
                    all
                };
                cand.sort_unstable_by(order);
                let probs: Vec<f64> = cand.iter().map(|c| weight(c) / sum).collect();
                if p.top_p >= 1.0 {
                    let n = probs.len();
                    break (probs, n);
                }
                // The fewest tokens whose probabilities reach top-p.
                let mut acc = 0.0;
                let reached = probs.iter().position(|pr| {
                    acc += pr;
                    acc >= p.top_p as f64
                });
                match reached {
                    Some(i) => break (probs, i + 1),
                    None if deepest || k > 0 => {
                        let n = probs.len();
                        break (probs, n);
                    }
                    None => {}
                }
            };
            if p.min_p > 0.0 {
                let floor = probs[0] * p.min_p as f64;
                keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
            }
            let total: f64 = probs[..keep].iter().sum();
            let mut r = self.rng.next_f64() * total;
            for (i, pr) in probs[..keep].iter().enumerate() {
                if r < *pr {
                    return cand[i].0;
                }
                r -= pr;
            }
            cand[keep - 1].0
        })
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        for &(tok, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l += bias;
            }
        }
        let needs =
            p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if !needs || history.is_empty() {
            return;
        }
        let window = if p.penalty_last_n == 0 {
            history
        } else {
            &history[history.len().saturating_sub(p.penalty_last_n)..]
        };
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        for (&tok, &n) in &counts {
            let Some(l) = logits.get_mut(tok as usize) else {
                continue;
            };
            if p.repetition_penalty != 1.0 {
                if *l > 0.0 {
                    *l /= p.repetition_penalty;
                } else {
                    *l *= p.repetition_penalty;
                }
            }
            *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

/// Index of the largest logit; the lowest index wins ties, as in llama.cpp.
pub fn argmax(logits: &[f32]) -> u32 {
    hearth_kernels::math::argmax(logits) as u32
}

/// The sampler's buffers, kept on the thread that samples (a vocabulary's worth each:
/// allocated per token, they were pages mapped and zeroed per token).
#[derive(Default)]
struct Scratch {
    weights: Vec<f32>,
    cand: Vec<(u32, f32)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Sum in f64, 8 partial sums side by side (one chain per lane, not one long chain).
fn sum_f64(w: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = w.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x as f64;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// The token at `u` (uniform in [0, 1)) of the way through the weights `w`: blocks of
/// 256 summed, the block found, then the token in it.
fn draw(w: &[f32], u: f64) -> u32 {
    const B: usize = 256;
    let sums: Vec<f64> = w.chunks(B).map(sum_f64).collect();
    let mut r = u * sums.iter().sum::<f64>();
    // Where rounding leaves `r` past a block's own sum (or past the end): the block's
    // last token with weight.
    let last_of = |b: usize| {
        let block = w.chunks(B).nth(b).unwrap_or(&[]);
        (b * B + block.iter().rposition(|&x| x > 0.0).unwrap_or(0)) as u32
    };
    for (b, (block, &s)) in w.chunks(B).zip(&sums).enumerate() {
        if r < s {
            for (i, &x) in block.iter().enumerate() {
                if r < x as f64 {
                    return (b * B + i) as u32;
                }
                r -= x as f64;
            }
            return last_of(b);
        }
        r -= s;
    }
    last_of(sums.iter().rposition(|&s| s > 0.0).unwrap_or(0))
}

/// log-softmax of one logit row, for logprobs: `l − max − ln Σ exp(l − max)`, the sum
/// over the vector `expf`'s weights in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = hearth_kernels::math::max_above_neg_inf(logits);
    let sum = SCRATCH.with(|scratch| {
        let w = &mut scratch.borrow_mut().weights;
        w.clear();
        // NaN weighs nothing (as −∞ does).
        w.extend(
            logits
                .iter()
                .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
        );
        hearth_kernels::math::exp_below(w, max);
        sum_f64(w)
    });
    let lse = sum.ln() as f32 + max;
    logits.iter().map(|&l| l - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &[]), 1);
    }

    #[test]
    fn draws_follow_the_distribution() {
        // p = 1/6, 2/6, 3/6 at temperature 1; top-k 2 keeps 2/5, 3/5; min-p 0.5 keeps the
        // tokens with at least half the top probability (2/5, 3/5 again).
        let logits = [0f32, 2f32.ln(), 3f32.ln()];
        let freq = |f: fn(&mut SamplingParams)| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = 3;
                f(p)
            }));
            let mut n = [0usize; 3];
            for _ in 0..60_000 {
                n[s.sample(&mut logits.clone(), &[]) as usize] += 1;
            }
            n.map(|c| c as f64 / 60_000.0)
        };
        let close = |a: [f64; 3], b: [f64; 3]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 0.01);
        let plain = freq(|_| {});
        assert!(close(plain, [1.0 / 6.0, 2.0 / 6.0, 0.5]), "{plain:?}");
        let top_k = freq(|p| p.top_k = 2);
        assert!(close(top_k, [0.0, 0.4, 0.6]), "{top_k:?}");
        let min_p = freq(|p| p.min_p = 0.5);
        assert!(close(min_p, [0.0, 0.4, 0.6]), "{min_p:?}");
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = seed;
            }));
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn a_vanishing_temperature_is_greedy() {
        for f in [
            (|_: &mut SamplingParams| {}) as fn(&mut SamplingParams),
            |p| p.top_p = 0.9,
        ] {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1e-38;
                f(p)
            }));
            assert_eq!(s.sample(&mut [1.0, 300.0, 299.0, f32::NAN], &[]), 1);
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 5.0;
            p.top_k = 1;
        }));
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 0.9], &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        for f in [
            (|p: &mut SamplingParams| p.top_p = 0.5) as fn(&mut SamplingParams),
            |p| p.min_p = 0.9,
        ] {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                f(p);
            }));
            for _ in 0..50 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
            }
        }
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.7;
        }));
        let seen: std::collections::HashSet<u32> = (0..200)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
    }

    /// A vocabulary-sized row (a permuted, slowly falling distribution whose top-p
    /// nucleus is past the first selection of 64): every draw lies in the nucleus a full
    /// sort gives, and the most likely token comes as often as its share of it says;
    /// tokens that are NaN or −∞ never come.
    #[test]
    fn top_p_over_a_vocabulary_keeps_the_nucleus() {
        let n = 50_000usize;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            perm.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut logits = vec![0f32; n];
        for (rank, &tok) in perm.iter().enumerate() {
            logits[tok] = -(rank as f32) * 0.01;
        }
        logits[perm[n - 1]] = f32::NAN;
        logits[perm[n - 2]] = f32::NEG_INFINITY;
        // The nucleus by a full sort in f64.
        let weights: Vec<f64> = (0..n - 2).map(|r| (-(r as f64) * 0.01).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let size = weights
            .iter()
            .position(|w| {
                acc += w / total;
                acc >= 0.5
            })
            .unwrap()
            + 1;
        assert!(
            size > 64,
            "the nucleus ({size}) must be past the first selection"
        );
        let nucleus: std::collections::HashSet<u32> =
            perm[..size].iter().map(|&t| t as u32).collect();
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5;
            p.seed = 11;
        }));
        let draws = 10_000;
        let mut top = 0;
        for _ in 0..draws {
            // No penalties: the row is not changed.
            let t = s.sample(&mut logits, &[]);
            assert!(nucleus.contains(&t), "token {t} is outside the nucleus");
            top += (t as usize == perm[0]) as usize;
        }
        let want = weights[0] / weights[..size].iter().sum::<f64>();
        let got = top as f64 / draws as f64;
        assert!((got - want).abs() < 0.006, "top token {got} vs {want}");
    }

    /// Plain temperature over a vocabulary-sized row: the heavy tokens come as often as
    /// their probabilities say, the tail as a whole too, and NaN or −∞ tokens never.
    #[test]
    fn temperature_over_a_vocabulary_follows_the_distribution() {
        let n = 50_000usize;
        let mut logits = vec![-5f32; n];
        logits[123] = 5.0;
        logits[40_000] = 4.0;
        logits[49_999] = 3.0;
        logits[7] = f32::NAN;
        logits[8] = f32::NEG_INFINITY;
        let e = |x: f64| x.exp();
        let total = e(5.0) + e(4.0) + e(3.0) + (n - 5) as f64 * e(-5.0);
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.seed = 5;
        }));
        let draws = 20_000;
        let mut counts = std::collections::HashMap::new();
        for _ in 0..draws {
            let t = s.sample(&mut logits, &[]);
            assert!(t != 7 && t != 8, "a NaN or −∞ token was drawn");
            *counts.entry(t).or_insert(0usize) += 1;
        }
        for (tok, logit) in [(123u32, 5.0), (40_000, 4.0), (49_999, 3.0)] {
            let got = counts.get(&tok).copied().unwrap_or(0) as f64 / draws as f64;
            let want = e(logit) / total;
            assert!((got - want).abs() < 0.01, "token {tok}: {got} vs {want}");
        }
    }

    /// The block-wise draw lands on the token whose share of the total covers `u`, never
    /// on a token of weight 0, at the ends of [0, 1) too.
    #[test]
    fn draw_lands_on_weighted_tokens() {
        let mut w = vec![0f32; 1_000];
        w[3] = 1.0;
        w[300] = 2.0;
        w[999] = 1.0;
        assert_eq!(draw(&w, 0.0), 3);
        assert_eq!(draw(&w, 0.2), 3);
        assert_eq!(draw(&w, 0.3), 300);
        assert_eq!(draw(&w, 0.74), 300);
        assert_eq!(draw(&w, 0.76), 999);
        assert_eq!(draw(&w, 1.0 - f64::EPSILON), 999);
        let one = [0.0, 0.0, 0.5];
        assert_eq!(draw(&one, 0.999_999), 2);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0));
        // token 0 is 2.0 -> 1.0 after the penalty, token 1 wins.
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]), 1);
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.3));
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0, 0]), 1);
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.6));
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]), 1);
        let mut s = Sampler::new(params(|p| p.logit_bias = vec![(1, 1.0)]));
        assert_eq!(s.sample(&mut [2.0, 1.5], &[]), 1);
    }

    #[test]
    fn validation_names_the_parameter() {
        assert!(params(|p| p.temperature = -1.0)
            .validate()
            .unwrap_err()
            .contains("temperature"));
        assert!(params(|p| p.top_p = 0.0)
            .validate()
            .unwrap_err()
            .contains("top_p"));
        assert!(params(|p| p.min_p = 2.0)
            .validate()
            .unwrap_err()
            .contains("min_p"));
        assert!(params(|p| p.temperature = f32::NAN).validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-5);
        // A vocabulary-sized row against f64, with −∞ and NaN entries.
        let mut l: Vec<f32> = (0..49_152)
            .map(|i| ((i * 7919 % 1000) as f32) * 0.02 - 10.0)
            .collect();
        l[5] = f32::NEG_INFINITY;
        l[6] = f32::NAN;
        let lp = log_softmax(&l);
        let m = 9.98f64;
        let lse = l
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| (x as f64 - m).exp())
            .sum::<f64>()
            .ln()
            + m;
        for (i, (&a, &x)) in lp.iter().zip(&l).enumerate() {
            if x.is_finite() {
                assert!((a as f64 - (x as f64 - lse)).abs() < 1e-5, "[{i}] {a}");
            }
        }
        assert_eq!(lp[5], f32::NEG_INFINITY);
    }
}

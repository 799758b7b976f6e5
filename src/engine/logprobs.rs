//! Log probabilities of sampled tokens, as OpenAI's `logprobs` reports them.
//!
//! The distribution is the model's own: a log-softmax over the full vocabulary of the raw
//! logits at the step that sampled the token, before `logit_bias`, penalties, the grammar,
//! temperature and any top-k/top-p cut. It says how likely the model found each token,
//! whatever the request then did with its sampler.

use serde::{Deserialize, Deserializer, Serialize};

/// One sampled token in OpenAI's `logprobs.content` shape (also read from remote tiers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub bytes: Vec<u8>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of the most likely tokens at a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub bytes: Vec<u8>,
}

/// Servers send `null` where a list is empty (`bytes` of a special token).
fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// The log probability of `chosen` and the `top` most likely token ids with theirs, most
/// likely first, from one step's raw logits.
pub fn log_softmax_top(logits: &[f32], chosen: usize, top: usize) -> (f32, Vec<(usize, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64: 262k terms in f32 lose the small ones.
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_norm = max + sum.ln() as f32;
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &logit) in logits.iter().enumerate() {
            // `best` is sorted, most likely first; ties keep the lower id first.
            if best.len() == top && best.last().is_some_and(|&(_, low)| logit <= low) {
                continue;
            }
            let at = best.partition_point(|&(_, l)| l >= logit);
            best.insert(at, (id, logit));
            best.truncate(top);
        }
    }
    let chosen_logprob = logits
        .get(chosen)
        .map_or(f32::NEG_INFINITY, |l| l - log_norm);
    let top = best
        .into_iter()
        .map(|(id, logit)| (id, logit - log_norm))
        .collect();
    (chosen_logprob, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_sum_to_one_and_the_top_is_sorted() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let (chosen, top) = log_softmax_top(&logits, 2, 3);
        let total: f32 = (0..logits.len())
            .map(|i| log_softmax_top(&logits, i, 0).0.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [1, 3, 0]);
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
        assert!((top[0].1 - (3.0 - logits.iter().map(|l| l.exp()).sum::<f32>().ln())).abs() < 1e-5);
        assert!(chosen < top[2].1);
    }

    #[test]
    fn no_alternatives_asked_gives_none() {
        let (chosen, top) = log_softmax_top(&[0.0, 0.0], 0, 0);
        assert!((chosen - 0.5f32.ln()).abs() < 1e-6);
        assert!(top.is_empty());
    }
}

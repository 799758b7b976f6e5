//! Routing by example: labelled prompts per class, and the nearest-neighbour vote that
//! `when.similar_to` rules ask.
//!
//! A policy's `[similarity]` table names example files (next to the policy) and may list
//! examples inline. At load every example is embedded once (the [`Embedder`] remembers
//! them across reloads). For a request, the last user message's embedding is compared with
//! every example; the `k` most similar at or above `min_similarity` vote, each with its
//! similarity, and the class with the most weight wins. A rule's `similar_to` holds when
//! the winner is one of its classes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::embed::{similarity, EmbedError, Embedder, Embedding};
use crate::tomlfile::{Problem, TomlFile};

/// Neighbours that vote, by default: measured on the held-out set (README).
pub const DEFAULT_K: usize = 7;
/// Examples less similar than this do not vote, by default (README).
pub const DEFAULT_MIN_SIMILARITY: f32 = 0.2;

/// `[similarity]` in a policy file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimilarity {
    /// Example files, relative to the policy file.
    pub examples: Option<Vec<PathBuf>>,
    pub k: Option<usize>,
    pub min_similarity: Option<f32>,
    /// Inline examples: class name to prompts.
    pub classes: Option<BTreeMap<String, Vec<String>>>,
}

/// An example file: one table per class.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    examples: Vec<String>,
}

/// The labelled examples of a policy; vectors are filled by [`ExampleSet::embed`].
#[derive(Debug)]
pub struct ExampleSet {
    pub classes: Vec<String>,
    /// The example files read, for the reloader to watch.
    pub files: Vec<PathBuf>,
    texts: Vec<String>,
    labels: Vec<usize>,
    vectors: Vec<Embedding>,
    pub k: usize,
    pub min_similarity: f32,
    /// Votes for recent request vectors, by their bits and the settings. A repeated question (every
    /// reply-cache hit is one) would otherwise be compared with every example again,
    /// which costs more than the rest of a cache hit.
    recent_votes: quick_cache::sync::Cache<Vec<u32>, Similar>,
}

/// Request vectors whose votes an [`ExampleSet`] keeps.
const RECENT_VOTES: usize = 1024;

/// One example near the request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Neighbour {
    pub class: String,
    pub similarity: f32,
    pub example: String,
}

/// How the nearest examples voted for one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Similar {
    /// The winning class; `None` when no example reached `min_similarity`.
    pub class: Option<String>,
    /// Summed similarity per class among the voters.
    pub votes: BTreeMap<String, f32>,
    /// The `k` nearest examples, most similar first (voters and not).
    pub nearest: Vec<Neighbour>,
}

impl ExampleSet {
    /// Reads `[similarity]` of the policy at `policy_file`; problems are reported with
    /// file, line and key.
    pub fn load(
        raw: &RawSimilarity,
        policy: &TomlFile,
        problems: &mut Vec<Problem>,
    ) -> Option<ExampleSet> {
        let mut by_class: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let base = policy.path.parent().unwrap_or(Path::new("."));
        let mut files = Vec::new();
        for file in raw.examples.iter().flatten() {
            let path = base.join(file);
            files.push(path.clone());
            match TomlFile::load::<BTreeMap<String, RawClass>>(&path) {
                Ok((classes, _)) => {
                    for (class, RawClass { examples }) in classes {
                        by_class.entry(class).or_default().extend(examples);
                    }
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        for (class, examples) in raw.classes.iter().flatten() {
            by_class
                .entry(class.clone())
                .or_default()
                .extend(examples.iter().cloned());
        }
        let k = raw.k.unwrap_or(DEFAULT_K);
        if k == 0 {
            problems.push(policy.problem("similarity.k", "must be at least 1"));
        }
        let min_similarity = raw.min_similarity.unwrap_or(DEFAULT_MIN_SIMILARITY);
        if !(-1.0..=1.0).contains(&min_similarity) {
            problems.push(policy.problem(
                "similarity.min_similarity",
                "a cosine similarity: between -1 and 1",
            ));
        }
        let mut set = ExampleSet {
            classes: Vec::new(),
            files,
            texts: Vec::new(),
            labels: Vec::new(),
            vectors: Vec::new(),
            k,
            min_similarity,
            recent_votes: quick_cache::sync::Cache::new(RECENT_VOTES),
        };
        for (class, examples) in by_class {
            let label = set.classes.len();
            set.classes.push(class);
            for text in examples.into_iter().filter(|t| !t.trim().is_empty()) {
                set.texts.push(text);
                set.labels.push(label);
            }
        }
        if set.texts.is_empty() {
            problems.push(policy.problem(
                "similarity",
                "no examples: name files in `examples` or list `classes`",
            ));
            return None;
        }
        Some(set)
    }

    pub fn is_embedded(&self) -> bool {
        !self.texts.is_empty() && self.vectors.len() == self.texts.len()
    }

    /// Embeds every example (from a blocking thread: it waits for the embedding thread).
    pub fn embed(&mut self, embedder: &Embedder) -> Result<(), EmbedError> {
        self.vectors = embedder.embed_examples_blocking(&self.texts)?;
        self.recent_votes.clear();
        Ok(())
    }

    /// The vote of the `k` examples nearest to `vector`.
    pub fn vote(&self, vector: &[f32]) -> Similar {
        // `k` and `min_similarity` are in the key: `eval-routing --sweep` changes them.
        let settings = [self.k as u32, self.min_similarity.to_bits()];
        let key: Vec<u32> = vector.iter().map(|x| x.to_bits()).chain(settings).collect();
        if let Some(similar) = self.recent_votes.get(&key) {
            return similar;
        }
        let similar = self.vote_without(vector, None);
        self.recent_votes.insert(key, similar.clone());
        similar
    }

    /// Leave-one-out: each example classified by the others. The share whose vote names
    /// its own class measures the set without held-out data (`tiergate eval-routing`).
    pub fn leave_one_out(&self) -> f64 {
        let agree = (0..self.vectors.len())
            .filter(|&i| {
                let similar = self.vote_without(&self.vectors[i], Some(i));
                similar.class.as_deref() == Some(self.classes[self.labels[i]].as_str())
            })
            .count();
        agree as f64 / self.vectors.len().max(1) as f64
    }

    fn vote_without(&self, vector: &[f32], skip: Option<usize>) -> Similar {
        let mut scored: Vec<(f32, usize)> = self
            .vectors
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(i, example)| (similarity(example, vector), i))
            .collect();
        let k = self.k.min(scored.len());
        if k > 0 && k < scored.len() {
            scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        }
        scored.truncate(k);
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes: BTreeMap<String, f32> = BTreeMap::new();
        for &(score, i) in &scored {
            if score >= self.min_similarity {
                *votes
                    .entry(self.classes[self.labels[i]].clone())
                    .or_default() += score;
            }
        }
        let class = votes
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(class, _)| class.clone());
        Similar {
            class,
            votes,
            nearest: scored
                .into_iter()
                .map(|(score, i)| Neighbour {
                    class: self.classes[self.labels[i]].clone(),
                    similarity: score,
                    example: self.texts[i].clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(vectors: Vec<Vec<f32>>, labels: Vec<usize>, k: usize, min: f32) -> ExampleSet {
        ExampleSet {
            classes: vec!["code".into(), "chitchat".into()],
            files: Vec::new(),
            texts: (0..vectors.len()).map(|i| format!("example {i}")).collect(),
            labels,
            vectors: vectors.into_iter().map(Embedding::from).collect(),
            k,
            min_similarity: min,
            recent_votes: quick_cache::sync::Cache::new(RECENT_VOTES),
        }
    }

    #[test]
    fn the_class_with_the_most_similarity_among_the_k_nearest_wins() {
        // Two "code" examples fairly close and one "chitchat" closest: 0.8 + 0.7 > 0.9.
        let examples = set(
            vec![
                vec![0.8, 0.6],
                vec![0.7, 0.714],
                vec![0.9, 0.436],
                vec![0.0, 1.0],
            ],
            vec![0, 0, 1, 1],
            3,
            0.3,
        );
        let similar = examples.vote(&[1.0, 0.0]);
        assert_eq!(similar.class.as_deref(), Some("code"));
        assert_eq!(similar.nearest.len(), 3);
        assert_eq!(similar.nearest[0].class, "chitchat");
        assert!((similar.votes["code"] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn examples_below_min_similarity_do_not_vote() {
        let examples = set(vec![vec![0.2, 0.98]], vec![0], 5, 0.5);
        let similar = examples.vote(&[1.0, 0.0]);
        assert_eq!(similar.class, None);
        assert!(similar.votes.is_empty());
        assert_eq!(similar.nearest.len(), 1);
    }

    #[test]
    fn a_repeated_vote_is_remembered_and_equal() {
        let set = set(
            vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.8, 0.6]],
            vec![0, 1, 0],
            2,
            0.1,
        );
        let first = set.vote(&[1.0, 0.0]);
        assert_eq!(set.recent_votes.len(), 1);
        assert_eq!(set.vote(&[1.0, 0.0]), first);
        assert_eq!(set.recent_votes.len(), 1);
        assert_eq!(first, set.vote_without(&[1.0, 0.0], None));
        assert_eq!(first.class.as_deref(), Some("code"));
    }

    #[test]
    fn a_remembered_vote_follows_a_change_of_k() {
        let mut set = set(
            vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.8, 0.6]],
            vec![0, 1, 1],
            1,
            0.1,
        );
        assert_eq!(set.vote(&[1.0, 0.0]).nearest.len(), 1);
        set.k = 3;
        let wider = set.vote(&[1.0, 0.0]);
        assert_eq!(wider.nearest.len(), 3);
        assert_eq!(wider.class.as_deref(), Some("chitchat"));
    }
}

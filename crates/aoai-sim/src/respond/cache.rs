//! The prompt cache, as AOAI bills it: a chat prompt of at least 1,024 tokens whose beginning
//! matches an earlier prompt to the same deployment reports the matched part, in steps of 128
//! tokens, as `prompt_tokens_details.cached_tokens` (priced at the cached rate).

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use serde_json::Value;
use tollgate_tokens::Encoding;

const MIN_TOKENS: usize = 1024;
const STEP: usize = 128;
/// Prefixes remembered before the cache is emptied (AOAI's entries expire within minutes).
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub(crate) struct PromptCache {
    seen: Mutex<HashSet<u64>>,
}

impl PromptCache {
    /// Cached tokens of this prompt (at most `prompt_tokens`), remembering its prefixes for the
    /// next request.
    pub(crate) fn cached_tokens(
        &self,
        deployment: &str,
        enc: Encoding,
        messages: &Value,
        prompt_tokens: u64,
    ) -> u64 {
        if prompt_tokens < MIN_TOKENS as u64 {
            return 0;
        }
        // The messages as text stand in for the prompt the model sees: equal messages give
        // equal prefixes, which is what caching turns on.
        let ids = enc.encode(&messages.to_string());
        let mut hasher = DefaultHasher::new();
        deployment.hash(&mut hasher);
        let mut prefixes = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            id.hash(&mut hasher);
            let len = i + 1;
            if len >= MIN_TOKENS && (len - MIN_TOKENS).is_multiple_of(STEP) {
                prefixes.push((len, hasher.clone().finish()));
            }
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = prefixes
            .iter()
            .filter(|(_, h)| seen.contains(h))
            .map(|(len, _)| *len as u64)
            .max()
            .unwrap_or(0);
        if seen.len() + prefixes.len() > MAX_ENTRIES {
            seen.clear();
        }
        seen.extend(prefixes.iter().map(|(_, h)| *h));
        cached.min(prompt_tokens / STEP as u64 * STEP as u64)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_repeated_long_prompt_is_cached_in_steps_of_128() {
        let cache = PromptCache::default();
        let long = json!([{"role": "user", "content": "word ".repeat(1500)}]);
        let enc = Encoding::O200kBase;
        assert_eq!(cache.cached_tokens("d", enc, &long, 1510), 0, "first time");
        let cached = cache.cached_tokens("d", enc, &long, 1510);
        assert!(
            cached >= 1024 && cached % 128 == 0 && cached <= 1510,
            "{cached}"
        );
        assert_eq!(
            cache.cached_tokens("other", enc, &long, 1510),
            0,
            "per deployment"
        );
        let short = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(cache.cached_tokens("d", enc, &short, 8), 0);
        assert_eq!(
            cache.cached_tokens("d", enc, &short, 8),
            0,
            "short prompts never"
        );
    }
}

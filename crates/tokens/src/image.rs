//! Prompt tokens of an image part, per model family (OpenAI "Images and vision", calculating
//! costs), checked against prompt_tokens measured on the API
//! (`fixtures/published_prompt_tokens.json`).
//!
//! - **Tiles** (gpt-4o, gpt-4.1, gpt-4-turbo, …; gpt-4o-mini and the o1/o3 family with their
//!   own constants): `detail: low` costs the base; otherwise the image is scaled down to fit
//!   2048×2048, then down so its short side is at most 768, and each 512-pixel tile costs the
//!   tile price on top of the base.
//! - **Patches** (gpt-4.1-mini, gpt-4.1-nano, o4-mini): 32-pixel patches (at most 1536, the
//!   image scaled down to fit), times a per-model multiplier, rounded up, plus one; `detail`
//!   does not matter. The plus one is measured, not documented: the published figures for all
//!   three models are one above the patch product.
//!
//! The size comes from a data URL's own bytes. An image given by http URL is not fetched: it is
//! counted as 1024×1024, and the count is a guess ([`ImageCount::size_known`]).

use base64::Engine as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Tiles {
        base: u64,
        tile: u64,
    },
    /// Multiplier in hundredths.
    Patches {
        multiplier: u64,
    },
}

/// The rule of a model; the longer family names are matched first.
fn rule(model: &str) -> Rule {
    let family = |prefix: &str| model.starts_with(prefix);
    if family("gpt-4o-mini") {
        Rule::Tiles {
            base: 2833,
            tile: 5667,
        }
    } else if family("gpt-4.1-mini") {
        Rule::Patches { multiplier: 162 }
    } else if family("gpt-4.1-nano") {
        Rule::Patches { multiplier: 246 }
    } else if family("o4-mini") {
        Rule::Patches { multiplier: 172 }
    } else if family("o1") || family("o3") {
        Rule::Tiles {
            base: 75,
            tile: 150,
        }
    } else {
        Rule::Tiles {
            base: 85,
            tile: 170,
        }
    }
}

/// What an image part costs, and whether its size was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageCount {
    pub tokens: u64,
    /// False for an image given by URL (or undecodable data): counted as 1024×1024.
    pub size_known: bool,
}

/// Tokens of one `image_url` part: `url` is the part's URL, `detail` its detail setting.
pub fn image_tokens(model: &str, url: &str, detail: Option<&str>) -> ImageCount {
    let size = data_url_size(url);
    let (width, height) = size.unwrap_or((1024, 1024));
    let tokens = match rule(model) {
        Rule::Tiles { base, .. } if detail == Some("low") => base,
        Rule::Tiles { base, tile } => {
            let (w, h) = fit_for_tiles(width, height);
            base + w.div_ceil(512) * h.div_ceil(512) * tile
        }
        Rule::Patches { multiplier } => (patches(width, height) * multiplier).div_ceil(100) + 1,
    };
    ImageCount {
        tokens,
        size_known: size.is_some(),
    }
}

/// Image parts of a chat body whose size could not be read (http URLs, undecodable data):
/// their count is a guess.
pub fn images_of_unknown_size(body: &serde_json::Value) -> usize {
    use serde_json::Value;
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|part| part.get("type").and_then(Value::as_str) == Some("image_url"))
        .filter(|part| {
            let url = part
                .pointer("/image_url/url")
                .and_then(Value::as_str)
                .unwrap_or("");
            data_url_size(url).is_none()
        })
        .count()
}

/// Scaled down (never up) to fit 2048×2048, then so the short side is at most 768.
fn fit_for_tiles(width: u64, height: u64) -> (u64, u64) {
    let (mut w, mut h) = (width.max(1) as f64, height.max(1) as f64);
    let fit = (2048.0 / w).min(2048.0 / h).min(1.0);
    w *= fit;
    h *= fit;
    let short = (768.0 / w.min(h)).min(1.0);
    ((w * short).floor() as u64, (h * short).floor() as u64)
}

/// 32-pixel patches, the image scaled down to fit 1536 of them when it has more.
fn patches(width: u64, height: u64) -> u64 {
    const MAX: u64 = 1536;
    let (w, h) = (width.max(1), height.max(1));
    let whole = w.div_ceil(32) * h.div_ceil(32);
    if whole <= MAX {
        return whole;
    }
    let (w, h) = (w as f64, h as f64);
    let shrink = (32.0 * 32.0 * MAX as f64 / (w * h)).sqrt();
    let (w, h) = (w * shrink, h * shrink);
    // Then to whole patches along the side that would overflow.
    let fit = ((w / 32.0).floor() / (w / 32.0)).min((h / 32.0).floor() / (h / 32.0));
    let (w, h) = (w * fit, h * fit);
    ((w / 32.0).ceil() as u64 * (h / 32.0).ceil() as u64).min(MAX)
}

/// Width and height of an image in a `data:…;base64,` URL, read from its header. Most formats
/// state the size in the first bytes; a JPEG after its metadata, so more is decoded only when
/// the first bytes do not tell.
fn data_url_size(url: &str) -> Option<(u64, u64)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    if !meta.ends_with(";base64") {
        return None;
    }
    let data = data.trim();
    for take in [4 * 1024, 256 * 1024, usize::MAX] {
        let whole = take >= data.len();
        // Whole base64 quanta only, so a prefix decodes.
        let end = if whole { data.len() } else { take / 4 * 4 };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.get(..end)?)
            .ok()?;
        if let Ok(size) = imagesize::blob_size(&bytes) {
            return Some((size.width as u64, size.height as u64));
        }
        if whole {
            break;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_follow_the_published_examples() {
        // OpenAI's worked examples: 1024×1024 high → 768×768, 4 tiles; 2048×4096 → 768×1536,
        // 6 tiles; low detail is the base.
        assert_eq!(fit_for_tiles(1024, 1024), (768, 768));
        assert_eq!(fit_for_tiles(2048, 4096), (768, 1536));
        assert_eq!(fit_for_tiles(128, 64), (128, 64), "never scaled up");
        let url = "https://example.com/cat.png";
        assert_eq!(image_tokens("gpt-4o", url, Some("high")).tokens, 765);
        assert_eq!(image_tokens("gpt-4o", url, Some("low")).tokens, 85);
        assert!(!image_tokens("gpt-4o", url, None).size_known);
        let body = serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "two"},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAIAAAABACAIAAABdtOgoAAAAbUlEQVR42u3RMQEAAAyDsPo3zWTsCRLI0muzAAAAAQAgAAAEAIAAABAAAAIAQAAACAAAAQAgAAAEAIAAABAAAAIAQAAACAAAAQAgAAAEAIAAABAAAAIAQAAACAAAAQAgAAAEAIAAABAAAAIAQHUVXqWSTHRRKwAAAABJRU5ErkJggg=="}}
        ]}]});
        assert_eq!(images_of_unknown_size(&body), 1);
    }

    #[test]
    fn patches_are_capped_at_1536() {
        assert_eq!(patches(128, 64), 8);
        assert_eq!(patches(1024, 1024), 1024);
        assert_eq!(
            patches(1800, 2400),
            1452,
            "OpenAI's example: 1800×2400 → 1452 patches"
        );
        assert!(patches(10_000, 10_000) <= 1536);
    }

    #[test]
    fn data_urls_give_their_size_and_anything_else_does_not() {
        let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAIAAAABACAIAAABdtOgoAAAAbUlEQVR42u3RMQEAAAyDsPo3zWTsCRLI0muzAAAAAQAgAAAEAIAAABAAAAIAQAAACAAAAQAgAAAEAIAAABAAAAIAQAAACAAAAQAgAAAEAIAAABAAAAIAQAAACAAAAQAgAAAEAIAAABAAAAIAQHUVXqWSTHRRKwAAAABJRU5ErkJggg==";
        assert_eq!(data_url_size(png), Some((128, 64)));
        assert_eq!(data_url_size("data:image/png;base64,!!!"), None);
        assert_eq!(data_url_size("data:text/plain,hello"), None);
        assert_eq!(data_url_size("https://example.com/x.png"), None);
    }
}

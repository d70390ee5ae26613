//! Long texts encoded in pieces cut where GPT-2's pre-tokenizer always cuts: the ids of
//! encoding the whole text, with the tokenizer's memory bounded by the piece size.
use infer::Tokenizer;

/// Bytes of text encoded per tokenizer call. The `tokenizers` crate keeps roughly 180
/// bytes of bookkeeping per input byte while it encodes (offsets, alignments, token
/// strings): a 20 MB line peaked at 3.6 GB in one call.
pub(crate) const PIECE_BYTES: usize = 1 << 18;

/// `text` in pieces of `piece` bytes or a little more (the last may be shorter), each
/// ending just before an ASCII whitespace byte that follows an ASCII non-whitespace one:
/// GPT-2's split regex always cuts there, so the pieces pre-tokenize (and encode) to the
/// words (and ids) of the whole text. (Every position starts a match of the regex, so
/// its matches tile the text; a match holding a non-whitespace character has whitespace
/// only as its first character, so the match holding byte i-1 ends at i; the regex has
/// no look-behind, so its matches from i on do not depend on what came before; and no
/// special token holds whitespace, so none spans a cut.)
pub(crate) fn gpt2_pieces(text: &str, piece: usize) -> impl Iterator<Item = &str> + Send {
    let bytes = text.as_bytes();
    let piece = piece.max(1);
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let mut end = start.saturating_add(piece).min(bytes.len());
        // In range: `end < len` and `end > start ≥ 0` (piece ≥ 1).
        while end < bytes.len()
            && !(bytes[end].is_ascii_whitespace() && bytes[end - 1].is_ascii_graphic())
        {
            end += 1;
        }
        // Both bytes around a cut are ASCII, so it is a char boundary.
        let s = &text[start..end];
        start = end;
        Some(s)
    })
}

/// Token ids of `text`, encoded in `gpt2_pieces` of `piece` bytes when `splittable`
/// (the tokenizer splits like GPT-2, see `splits_like_gpt2`): the ids of encoding it
/// whole. `on_piece(bytes done, ids so far)` is called before and between pieces.
pub(crate) fn encode_in_pieces(
    tokenizer: &Tokenizer,
    text: &str,
    splittable: bool,
    piece: usize,
    on_piece: &mut dyn FnMut(usize, usize),
) -> infer::Result<Vec<i64>> {
    on_piece(0, 0);
    if !splittable || text.len() <= piece {
        return tokenizer.encode(text);
    }
    let mut ids = Vec::new();
    let mut done = 0;
    for p in gpt2_pieces(text, piece) {
        ids.extend(tokenizer.encode(p)?);
        done += p.len();
        on_piece(done, ids.len());
    }
    Ok(ids)
}

/// Whether `tokenizer` splits text as GPT-2's does, so that `encode_in_pieces` may cut
/// it: a byte-level BPE with the split regex and no prefix space, no normalizer, no
/// truncation or padding, and added tokens without whitespace or strip rules.
/// `vocab.json` + `merges.txt` load that way; a `tokenizer.json` is read to check.
pub(crate) fn splits_like_gpt2(tokenizer: &Tokenizer) -> bool {
    let path = tokenizer.path();
    if path.file_name() != Some(std::ffi::OsStr::new(infer::tokenizer::TOKENIZER_JSON)) {
        return true;
    }
    let Some(json) = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return false;
    };
    // `Value` indexing never panics (a missing key reads as null).
    let pre = &json["pre_tokenizer"];
    let flag = |v: &serde_json::Value, name: &str, default: bool| {
        v.get(name)
            .map_or(Some(default), serde_json::Value::as_bool)
    };
    let added_ok = json["added_tokens"].as_array().is_some_and(|tokens| {
        tokens.iter().all(|t| {
            t["content"]
                .as_str()
                .is_some_and(|c| !c.chars().any(char::is_whitespace))
                && ["lstrip", "rstrip", "single_word"]
                    .iter()
                    .all(|f| flag(t, f, false) == Some(false))
        })
    });
    json["normalizer"].is_null()
        && json["truncation"].is_null()
        && json["padding"].is_null()
        && pre["type"] == "ByteLevel"
        && flag(pre, "add_prefix_space", true) == Some(false)
        && flag(pre, "use_regex", true) == Some(true)
        && (json["post_processor"].is_null() || json["post_processor"]["type"] == "ByteLevel")
        && json["model"]["type"] == "BPE"
        && json["model"]["dropout"].is_null()
        && added_ok
}

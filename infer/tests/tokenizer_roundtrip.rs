//! decode(encode(s)) == s for arbitrary Unicode with both tokenizer formats, and
//! decoding arbitrary in-range ids never panics.
mod common;

use common::*;
use infer::Tokenizer;
use proptest::prelude::*;

fn tokenizers() -> Vec<Tokenizer> {
    // hub-tied ships tokenizer.json; prefixed-untied only vocab.json + merges.txt.
    ["hub-tied", "prefixed-untied"]
        .iter()
        .map(|n| Tokenizer::from_dir(&model_dir(n)).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn decode_inverts_encode(s in "\\PC*|[\\x00-\\x7f]*|(\\PC|\\s){0,40}") {
        for tok in tokenizers() {
            let ids = tok.encode(&s).unwrap();
            prop_assert_eq!(tok.decode(&ids).unwrap(), s.clone());
        }
    }

    #[test]
    fn decoding_any_ids_never_panics(ids in proptest::collection::vec(0i64..300, 0..40)) {
        for tok in tokenizers() {
            tok.decode(&ids).unwrap();
        }
    }
}

#[test]
fn special_cases_round_trip_and_bad_ids_are_errors() {
    for tok in tokenizers() {
        for s in [
            "",
            "\0",
            "🚀🚀 日本語",
            "<|endoftext|>",
            "a\r\n\tb  ",
            &"a".repeat(10_000),
        ] {
            assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
        }
        let v = tok.vocab_size() as i64;
        assert!(tok
            .decode(&[v])
            .unwrap_err()
            .to_string()
            .contains(&v.to_string()));
        assert!(tok.decode(&[-1]).is_err());
    }
}

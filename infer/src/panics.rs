//! Panics the engine expects and handles: libtorch errors inside code written with tch's
//! panicking calls (a CUDA graph capture that meets an op it cannot record, a KV cache
//! the allocator refuses). `caught` turns one into an error message; while it runs, the
//! CLI's panic hook stays quiet (`quiet`), so the user sees the handled error, not an
//! "internal error" with libtorch's stack.
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; a panic in it becomes `Err` with its message's first line.
pub fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = QUIET.with(|q| q.replace(true));
    let out = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    out.map_err(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        tidy(text.lines().next().unwrap_or_default())
    })
}

/// A panic message as a person reads it: tch's unwrapped libtorch error (`called
/// \`Result::unwrap()\` on an \`Err\` value: Torch("MESSAGE\nframe #0: ...")`) becomes
/// MESSAGE, without libtorch's stack.
fn tidy(text: &str) -> String {
    let Some(i) = text.find("Torch(\"") else {
        return text.to_string();
    };
    let rest = &text[i + 7..];
    let end = rest
        .find("\\n")
        .or_else(|| rest.rfind("\")"))
        .unwrap_or(rest.len());
    rest[..end].to_string()
}

/// Whether the panic being raised on this thread is one `caught` handles.
pub fn quiet() -> bool {
    QUIET.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_first_line_and_quiet_ends_with_it() {
        let r: Result<(), String> = caught(|| {
            assert!(quiet());
            panic!("first line\nlibtorch's stack");
        });
        assert_eq!(r.unwrap_err(), "first line");
        assert!(!quiet());
        assert_eq!(caught(|| 7), Ok(7));
        let torch =
            r#"called `Result::unwrap()` on an `Err` value: Torch("can't allocate\nframe #0: x")"#;
        assert_eq!(caught(|| panic!("{torch}")).unwrap_err(), "can't allocate");
    }
}

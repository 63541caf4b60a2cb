//! Runs code that may panic on damaged data (redb panics on some corrupt pages) and turns the
//! panic into an error, without the panic hook printing a message and a backtrace: an operator
//! must see one clear line, not a Rust panic trace.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// True while this thread runs inside [`catch`]: the hook stays silent for it only, so a
    /// panic on another thread is reported as usual.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

static HOOK: Once = Once::new();

/// Wraps the process's panic hook once: silent on a thread inside [`catch`], the previous hook
/// otherwise. Swapping hooks per call would race between threads and could leave the silent
/// one installed for good.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic becomes `Err` with its message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let was = QUIET.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(super::catch(|| 7), Ok(7));
        let caught = super::catch(|| -> u8 { panic!("page {} is damaged", 3) });
        assert_eq!(caught, Err("page 3 is damaged".to_string()));
        let caught = super::catch(|| -> u8 { panic!("static message") });
        assert_eq!(caught, Err("static message".to_string()));
    }
}

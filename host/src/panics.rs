//! Panics caught where they must not travel further: libraries the worker calls (cudarc
//! panics when a CUDA library or one of its functions cannot be loaded, or when it cannot
//! allocate a workspace) and the inference thread, whose death would leave every later job
//! unable to run. Caught once here, with the panic's message kept for the error.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

thread_local! {
    /// How many `catch` calls this thread is inside.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

static QUIET_HOOK: Once = Once::new();

/// `f`'s result, or the message of the panic it raised. The callers drop or rebuild whatever
/// state `f` touched, so unwind safety is asserted here.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(install_quiet_hook);
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.map_err(|panic| message(panic.as_ref()))
}

/// Wraps the panic hook so a panic that `catch` turns into an error is logged as one line
/// with its location, instead of the "thread 'main' panicked at" banner and backtrace note
/// that read as a crash before the error was printed (a CUDA build on a machine without the
/// driver). Panics anywhere else still reach the previous hook.
fn install_quiet_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CATCHING.with(Cell::get) > 0 {
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            // As the default hook would: a backtrace when RUST_BACKTRACE asks for one (an
            // absent field otherwise).
            let backtrace = std::backtrace::Backtrace::capture();
            let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
                .then(|| backtrace.to_string());
            tracing::warn!(%location, message = %message(info.payload()), backtrace = backtrace.as_deref(), "caught a panic; it becomes an error");
        } else {
            previous(info);
        }
    }));
}

/// A panic's message: its `String` or `&str` payload, as `panic!` makes them.
fn message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "no message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(catch(|| 7), Ok(7));
        let formatted = catch(|| -> u8 { panic!("lost {} of {}", 2, 3) });
        assert_eq!(formatted, Err("lost 2 of 3".to_string()));
        let literal = catch(|| -> u8 { panic!("plain") });
        assert_eq!(literal, Err("plain".to_string()));
        let other = catch(|| -> u8 { std::panic::panic_any(42u32) });
        assert_eq!(other, Err("no message".to_string()));
    }

    #[test]
    fn only_panics_inside_catch_are_kept_from_the_previous_hook() {
        let _ = catch(|| 0);
        assert_eq!(CATCHING.with(Cell::get), 0);
        let nested = catch(|| {
            assert_eq!(CATCHING.with(Cell::get), 1);
            catch(|| -> u8 { panic!("inner") })
        });
        assert_eq!(nested, Ok(Err("inner".to_string())));
        assert_eq!(
            CATCHING.with(Cell::get),
            0,
            "the depth unwinds with the panic"
        );
    }
}

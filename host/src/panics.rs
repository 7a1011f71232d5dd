//! Panics caught where they must not travel further: libraries the worker calls (cudarc
//! panics when a CUDA library or one of its functions cannot be loaded, or when it cannot
//! allocate a workspace) and the inference thread, whose death would leave every later job
//! unable to run. Caught once here, with the panic's message kept for the error.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// `f`'s result, or the message of the panic it raised. The callers drop or rebuild whatever
/// state `f` touched, so unwind safety is asserted here.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| message(panic.as_ref()))
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
}

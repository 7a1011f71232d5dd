//! Encoding prompts keeps nothing behind: the tokenizers' per-word caches are off, so a
//! worker that sees new words in every prompt (names, numbers) holds the same allocations
//! after a thousand prompts as after the first few. With the caches on (the `tokenizers`
//! default, up to 10 000 words each, never evicted) every new word left a handful of small
//! allocations alive, which the soak bench showed as resident memory creeping job after job.
//! Its own process: the live-allocation counter is a global allocator.

use candle_core::{DType, Device};
use headshot_host::pipeline::source::ModelFiles;
use headshot_host::pipeline::text::TextEncoders;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[test]
fn encoding_new_words_leaves_no_allocations_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = ModelFiles::Dir(
        headshot_host::pipeline::demo::ensure_demo_weights(dir.path()).expect("demo weights"),
    );
    let device = Device::Cpu;
    let (mut encoders, _) = TextEncoders::load(&files, DType::F32, &device).expect("encoders");
    let mut encode = |i: usize| {
        // Every prompt brings words no earlier prompt had, as user prompts with names do.
        let prompt = format!(
            "studio portrait of person {i} named qx{i}z, soft light {}",
            i * 7
        );
        encoders
            .encode(&prompt, 32, &device, DType::F32)
            .expect("encode");
    };
    for i in 0..20 {
        encode(i);
    }
    let before = counting_alloc::live_allocations() as isize;
    const PROMPTS: usize = 1000;
    for i in 20..20 + PROMPTS {
        encode(i);
    }
    let grown = counting_alloc::live_allocations() as isize - before;
    eprintln!("live allocations after {PROMPTS} prompts with new words: {grown:+}");
    // Each new word the caches kept was at least three allocations (the word, its pieces'
    // list, a piece) in each of the two tokenizers: thousands over this run.
    assert!(
        grown < 100,
        "{grown} allocations stayed alive after {PROMPTS} prompts: something keeps per-prompt state"
    );
}

//! The bridge's upward checks and its interval-set watermark: a message on any of the store's
//! topics must never panic, and what it accepts must never make the watermark confirm a
//! roostseq beyond what it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_bridge::{check_upward, Upward, Watermark};
use roost_schemas::Topics;

fuzz_target!(|data: &[u8]| {
    let topics = Topics::default();
    let mut w = Watermark::new(0);
    let mut max = 0u64;
    // Several messages in one input, split on a separator byte.
    for (i, chunk) in data.split(|b| *b == 0x1e).enumerate() {
        let topic = match i % 3 {
            0 => topics.events("s1"),
            1 => topics.status("s1"),
            _ => topics.presence("s1"),
        };
        if let Ok(Upward::Event { roostseq, lost }) = check_upward(&topics, "s1", &topic, chunk) {
            assert!(lost.iter().all(|(a, b)| a <= b && *b < roostseq));
            max = max.max(roostseq);
            w.add_event(roostseq, &lost);
            assert!(w.upto() <= max);
        }
    }
});

//! Arbitrary bytes as captured Ethernet frames: never a panic, payload always inside the frame.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = bytes::Bytes::copy_from_slice(data);
    if let Ok(seg) = mirror_agent::segment::parse_frame(&frame, 0) {
        assert!(seg.payload.len() <= data.len());
    }
});

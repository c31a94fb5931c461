//! Arbitrary bytes as a recording file: never a panic, and every issue says where it is.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, issues) = mirror_agent::record::reader::read_bytes("fuzz", data.to_vec());
    for issue in issues {
        assert!(issue.offset <= data.len());
    }
});

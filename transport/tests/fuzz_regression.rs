//! The saved inputs of the wire-decoder fuzz target (`fuzz/regression/
//! frame_decoder/`, a minimized corpus), run through the same checks as
//! the fuzzer (allocation accounting aside): a crash the fuzzer once found
//! stays fixed.

#[path = "../../fuzz/common/frame_decoder.rs"]
mod common;

#[test]
fn saved_frame_decoder_inputs_decode_or_fail_cleanly() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regression/frame_decoder");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| common::check(&data, &|| 0));
        assert!(r.is_ok(), "{} fails the checks", path.display());
        n += 1;
    }
    assert!(n >= 10, "only {n} saved inputs in {}", dir.display());
}

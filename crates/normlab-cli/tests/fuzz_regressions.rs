//! Every input a fuzz target once crashed on, kept under
//! `tests/fuzz-regressions/TARGET/`, replayed through the same target body
//! (the functions of `fuzz/src/`, compiled in here): a crash found once
//! stays fixed. `scripts/fuzz` explores further; this runs in every test run.

use normlab_cli::{conformance, data};

#[allow(dead_code)]
#[path = "../../../fuzz/src/conformance_case.rs"]
mod conformance_case;
#[allow(dead_code)]
#[path = "../../../fuzz/src/loaders.rs"]
mod loaders;
#[allow(dead_code)]
#[path = "../../../fuzz/src/shapes.rs"]
mod shapes;
#[allow(dead_code)]
#[path = "../../../fuzz/src/state_file.rs"]
mod state_file;

/// Replays every file of `tests/fuzz-regressions/TARGET/` through `run`;
/// returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz-regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        eprintln!("{target}: {}", path.display());
        run(&bytes);
        count += 1;
    }
    count
}

#[test]
fn crash_inputs_found_by_fuzzing_stay_fixed() {
    let replayed = replay("shapes", shapes::shapes)
        + replay("state_file", state_file::state_file)
        + replay("conformance_case", conformance_case::conformance_case)
        + replay("idx_files", loaders::idx_files)
        + replay("data_dir", loaders::data_dir);
    assert!(replayed > 0, "no regression inputs found");
}

//! Environment archives: any bytes are an image layout or an error, and
//! nothing is written outside the scratch directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = tempfile::tempdir().unwrap();
    let (archive, scratch) = (root.path().join("in.tar"), root.path().join("scratch"));
    std::fs::write(&archive, data).unwrap();
    std::fs::create_dir(&scratch).unwrap();
    let _ = rivernode::oci::check_archive(&archive, &scratch);
    let mut names: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["in.tar", "scratch"],
        "something escaped the scratch directory"
    );
});

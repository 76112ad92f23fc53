//! Keeps docs/conformance.md true: every behaviour S01–S33 has exactly one row, every test a
//! row names exists in the file it names, and a row marked "done" names an e2e test.
use std::collections::BTreeMap;

const DOC: &str = include_str!("../../docs/conformance.md");

fn source_of(prefix: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/");
    let path = match prefix {
        "e2e" => "tests/e2e.rs",
        "datapath" => "tests/datapath.rs",
        "datapath_reject" => "tests/datapath_reject.rs",
        "datapath_fragments" => "tests/datapath_fragments.rs",
        "datapath_conntrack" => "tests/datapath_conntrack.rs",
        "compute" => "src/model/compute.rs",
        other => panic!("unknown test file prefix {other:?} in docs/conformance.md"),
    };
    std::fs::read_to_string(format!("{root}{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn conformance_table_names_existing_tests_for_every_behaviour() {
    let mut rows: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in DOC.lines().filter(|l| l.starts_with("| S")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 5, "malformed row: {line}");
        let id = cells[0].to_string();
        assert!(
            rows.insert(id.clone(), (cells[2].to_string(), cells[4].to_string()))
                .is_none(),
            "{id} twice"
        );
    }
    let expected: Vec<String> = (1..=33).map(|n| format!("S{n:02}")).collect();
    assert_eq!(
        rows.keys().cloned().collect::<Vec<_>>(),
        expected,
        "every behaviour exactly once"
    );
    for (id, (tests, status)) in &rows {
        assert!(
            ["done", "partial", "open"].contains(&status.as_str()),
            "{id}: status {status:?}"
        );
        if tests == "—" {
            assert_eq!(status, "open", "{id} names no test but is not open");
            continue;
        }
        for test in tests.split(',').map(str::trim) {
            let (file, name) = test
                .split_once("::")
                .unwrap_or_else(|| panic!("{id}: {test:?} is not file::test"));
            let source = source_of(file);
            assert!(
                source.contains(&format!("fn {name}(")),
                "{id}: no test {name} in {file}"
            );
        }
        if status == "done" {
            assert!(
                tests.contains("e2e::"),
                "{id} is marked done without an end-to-end test"
            );
        }
    }
}

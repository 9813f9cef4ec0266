use std::collections::BTreeSet;

use super::*;

fn one(name: &str, value: &str) -> Vec<(String, String)> {
    vec![(name.to_string(), value.to_string())]
}

#[test]
fn every_name_is_declared_once_and_documented() {
    let names: BTreeSet<_> = ALL.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), ALL.len(), "a variable is declared twice");
    for s in ALL {
        assert!(s.name.starts_with("TANDEM_"), "{}", s.name);
        assert!(!s.doc.trim().is_empty(), "{} has no doc", s.name);
        assert_eq!(find(s.name), Some(s));
    }
    assert_eq!(find("TANDEM_NO_SUCH"), None);
}

#[test]
fn declared_defaults_are_values_the_variable_accepts() {
    for s in ALL {
        let plain = !s.default.is_empty() && !s.default.contains([' ', '`']);
        if plain {
            s.parse(s.default)
                .unwrap_or_else(|e| panic!("{}'s default {:?}: {e}", s.name, s.default));
        }
    }
}

#[test]
fn seconds_are_positive_finite_and_bounded() {
    let read = |v: &str| TIMEOUT.seconds(&one(TIMEOUT.name, v));
    assert_eq!(read("0.5").unwrap(), Some(Duration::from_millis(500)));
    assert_eq!(read(" 86400 ").unwrap(), Some(Duration::from_secs(86_400)));
    for bad in ["0", "-1", "86400.5", "inf", "NaN", "soon"] {
        let e = read(bad).unwrap_err().to_string();
        assert!(
            e.contains("TANDEM_TIMEOUT")
                && e.contains("seconds, above 0 up to 86400")
                && e.contains(bad),
            "{bad}: {e}"
        );
    }
    assert_eq!(TIMEOUT.seconds(&one("OTHER", "1")).unwrap(), None);
    assert_eq!(TIMEOUT.seconds(&one(TIMEOUT.name, "  ")).unwrap(), None);
}

#[test]
fn integers_are_checked_at_both_ends() {
    let read = |v: &str| SEGMENT_BYTES.count(&one(SEGMENT_BYTES.name, v));
    assert_eq!(read("4096").unwrap(), Some(4096));
    assert_eq!(read("67108864").unwrap(), Some(64 << 20));
    for bad in ["4095", "67108865", "-4096", "1e6", "many"] {
        let e = read(bad).unwrap_err().to_string();
        assert!(e.contains("an integer from 4096 to 67108864"), "{bad}: {e}");
    }
}

#[test]
fn choices_ignore_case_and_name_every_word() {
    let read = |v: &str| BACKEND.choice(&one(BACKEND.name, v));
    assert_eq!(read("NCCL").unwrap(), Some("nccl"));
    assert_eq!(read("tcp").unwrap(), Some("tcp"));
    let e = read("gloo").unwrap_err().to_string();
    assert!(
        e.contains("one of auto, tcp, nccl") && e.contains("\"gloo\""),
        "{e}"
    );
}

#[test]
fn switches_take_the_usual_spellings_and_nothing_else() {
    let read = |v: &str| INSECURE.switch(&one(INSECURE.name, v));
    for on in ["1", "on", "TRUE", "yes"] {
        assert_eq!(read(on).unwrap(), Some(true), "{on}");
    }
    for off in ["0", "Off", "false", "no"] {
        assert_eq!(read(off).unwrap(), Some(false), "{off}");
    }
    let e = read("2").unwrap_err().to_string();
    assert!(e.contains("TANDEM_INSECURE") && e.contains("1 or 0"), "{e}");
}

#[test]
fn bounds_need_one_at_least_and_an_ordered_pair() {
    let read = |v: &str| ELASTIC.bounds(&one(ELASTIC.name, v));
    assert_eq!(read("2").unwrap(), Some((2, None)));
    assert_eq!(read("1:1").unwrap(), Some((1, Some(1))));
    assert_eq!(read("2 : 8").unwrap(), Some((2, Some(8))));
    for bad in ["0", "0:4", "3:2", "a:b", "2:", ":2"] {
        let e = read(bad).unwrap_err().to_string();
        assert!(e.contains("MIN or MIN:MAX"), "{bad}: {e}");
    }
}

#[test]
fn addresses_need_a_host_and_a_port() {
    let read = |v: &str| METRICS_ADDR.text(&one(METRICS_ADDR.name, v));
    assert_eq!(read("h:9400").unwrap().as_deref(), Some("h:9400"));
    for bad in ["h", "h:0", ":9400", "h:65536"] {
        assert!(
            read(bad)
                .unwrap_err()
                .to_string()
                .contains("TANDEM_METRICS_ADDR"),
            "{bad}"
        );
    }
}

#[test]
fn reading_a_setting_as_another_kind_is_an_error_not_a_guess() {
    let e = TIMEOUT
        .count(&one(TIMEOUT.name, "3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("TANDEM_TIMEOUT") && e.contains("declared as"),
        "{e}"
    );
    assert_eq!(TIMEOUT.count(&one("OTHER", "3")).unwrap(), None);
}

#[test]
fn check_all_refuses_a_bad_value_and_returns_unknown_names() {
    let vars = vec![
        ("TANDEM_TIMEOUT".to_string(), "5".to_string()),
        ("TANDEM_TIMEOTU".to_string(), "5".to_string()),
        ("TANDEM_TEST_ANYTHING".to_string(), "x".to_string()),
        ("OTHER".to_string(), "x".to_string()),
    ];
    let names: Vec<String> = vars.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        check_all(&vars, &names).unwrap(),
        vec!["TANDEM_TIMEOTU".to_string()]
    );
    let bad = vec![("TANDEM_STREAMS_PER_PEER".to_string(), "9".to_string())];
    let e = check_all(&bad, &["TANDEM_STREAMS_PER_PEER".to_string()]).unwrap_err();
    assert!(e.to_string().contains("an integer from 1 to 8"), "{e}");
}

#[test]
fn the_docs_table_has_a_row_per_setting_under_its_area() {
    let md = markdown();
    for s in ALL {
        assert_eq!(
            md.matches(&format!("| `{}` |", s.name)).count(),
            1,
            "{}",
            s.name
        );
    }
    let areas = md.matches("\n#### ").count();
    let distinct: BTreeSet<_> = ALL.iter().map(|s| s.area).collect();
    assert_eq!(areas, distinct.len(), "each area's rows stand together");
}

/// `docs/launching.md` holds [`markdown`]'s output between its markers; run with
/// `TANDEM_TEST_WRITE_DOCS=1` to write it there after changing the table.
#[test]
fn the_docs_reference_is_the_table() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/launching.md");
    let text = std::fs::read_to_string(&path).expect("docs/launching.md");
    let (begin, end) = ("<!-- settings:begin -->\n", "<!-- settings:end -->");
    let a = text.find(begin).expect("the begin marker") + begin.len();
    let b = text.find(end).expect("the end marker");
    let want = format!("{}\n", markdown().trim_start());
    if std::env::var_os("TANDEM_TEST_WRITE_DOCS").is_some() {
        let new = format!("{}{want}{}", &text[..a], &text[b..]);
        std::fs::write(&path, new).expect("writing docs/launching.md");
        return;
    }
    assert!(
        text[a..b] == want,
        "docs/launching.md's variables differ from tandem_core::settings; run \
         TANDEM_TEST_WRITE_DOCS=1 cargo test -p tandem-core the_docs_reference to write them:\n{want}"
    );
}

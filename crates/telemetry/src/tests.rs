use super::*;
use proptest::prelude::*;

const NOW: i64 = 1_700_000_000_000;

fn lim() -> Limits {
    Limits::default()
}

fn dec(payload: &str, ct: Option<ContentType>) -> Result<Vec<Point>, DecodeError> {
    decode(payload.as_bytes(), ct, NOW, &lim())
}

fn pt(metric: &str, ts_ms: i64, value: Value) -> Point {
    Point {
        metric: metric.into(),
        ts_ms,
        value,
    }
}

fn f(x: f64) -> Value {
    Value::F64(x)
}

// ---- SenML JSON: RFC 8428 §6 examples ----

const SINGLE: &str = r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#;

const MULTIPLE_DATAPOINTS: &str = r#"[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]"#;

const MULTIPLE_MEASUREMENTS: &str = r#"[
  {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
   "bu":"A","bver":5,
   "n":"voltage","u":"V","v":120.1},
  {"n":"current","t":-5,"v":1.2},
  {"n":"current","t":-4,"v":1.3},
  {"n":"current","t":-3,"v":1.4},
  {"n":"current","t":-2,"v":1.5},
  {"n":"current","t":-1,"v":1.6},
  {"n":"current","v":1.7}
]"#;

#[test]
fn senml_single_datapoint() {
    let expected = vec![pt("urn:dev:ow:10e2073a01080063", NOW, f(23.1))];
    assert_eq!(
        dec(SINGLE, Some(ContentType::SenmlJson)),
        Ok(expected.clone())
    );
    assert_eq!(dec(SINGLE, None), Ok(expected));
}

#[test]
fn senml_multiple_datapoints() {
    let expected = vec![
        pt("urn:dev:ow:10e2073a01080063:voltage", NOW, f(120.1)),
        pt("urn:dev:ow:10e2073a01080063:current", NOW, f(1.2)),
    ];
    assert_eq!(dec(MULTIPLE_DATAPOINTS, None), Ok(expected));
}

#[test]
fn senml_multiple_measurements() {
    let points = dec(MULTIPLE_MEASUREMENTS, Some(ContentType::SenmlJson)).unwrap();
    let bn = "urn:dev:ow:10e2073a0108006:";
    let mut expected = vec![pt(&format!("{bn}voltage"), 1_276_020_076_001, f(120.1))];
    for (t, v) in [
        (-5, 1.2),
        (-4, 1.3),
        (-3, 1.4),
        (-2, 1.5),
        (-1, 1.6),
        (0, 1.7),
    ] {
        expected.push(pt(
            &format!("{bn}current"),
            1_276_020_076_001 + t * 1000,
            f(v),
        ));
    }
    assert_eq!(points, expected);
}

#[test]
fn senml_base_value_strings_bools_and_skips() {
    let p = r#"[{"bn":"d/","bv":10,"n":"a","v":1.5},{"n":"s","vs":"on"},
               {"n":"b","vb":true},{"n":"nothing","u":"V"},{"n":"data","vd":"AA"},
               {"n":"rel","t":2.5,"v":0}]"#;
    assert_eq!(
        dec(p, Some(ContentType::SenmlJson)),
        Ok(vec![
            pt("d/a", NOW, f(11.5)),
            pt("d/s", NOW, Value::Str("on".into())),
            pt("d/b", NOW, Value::Bool(true)),
            pt("d/rel", NOW + 2500, f(10.0)),
        ])
    );
}

#[test]
fn senml_errors() {
    let s = Some(ContentType::SenmlJson);
    assert!(matches!(
        dec(r#"{"n":"a","v":1}"#, s),
        Err(DecodeError::InvalidSenml(_))
    ));
    assert!(matches!(
        dec(r#"[1]"#, s),
        Err(DecodeError::InvalidSenml(_))
    ));
    assert!(matches!(
        dec(r#"[{"v":1}]"#, s),
        Err(DecodeError::InvalidSenml(_))
    ));
    assert!(matches!(
        dec(r#"[{"n":"a","v":"x"}]"#, s),
        Err(DecodeError::InvalidSenml(_))
    ));
    assert!(matches!(
        dec(r#"[{"n":"a","v":1,"vs":"x"}]"#, s),
        Err(DecodeError::InvalidSenml(_))
    ));
    assert!(matches!(
        dec(r#"[{"n":"a","v":1,"foo_":1}]"#, s),
        Err(DecodeError::InvalidSenml(_))
    ));
    assert!(matches!(
        dec(r#"[{"n":"a","v":1,"t":1e300}]"#, s),
        Err(DecodeError::BadTimestamp(_))
    ));
    assert!(matches!(
        dec(r#"[{"n":"a","v":1"#, s),
        Err(DecodeError::InvalidJson(_))
    ));
}

// ---- SenML CBOR ----

/// `[{-2: "dev:", 0: "temp", 2: 21.5 (half)},
///   {0: "door", 4: true, 6: 1600000000}, {0: "x", 8: h'00'}]`
const SENML_CBOR: &[u8] = &[
    0x83, //
    0xa3, 0x21, 0x64, b'd', b'e', b'v', b':', 0x00, 0x64, b't', b'e', b'm', b'p', 0x02, 0xf9, 0x4d,
    0x60, //
    0xa3, 0x00, 0x64, b'd', b'o', b'o', b'r', 0x04, 0xf5, 0x06, 0x1a, 0x5f, 0x5e, 0x10, 0x00,
    //
    0xa2, 0x00, 0x61, b'x', 0x08, 0x41, 0x00,
];

#[test]
fn senml_cbor() {
    let expected = vec![
        pt("dev:temp", NOW, f(21.5)),
        pt("dev:door", 1_600_000_000_000, Value::Bool(true)),
    ];
    assert_eq!(
        decode(SENML_CBOR, Some(ContentType::SenmlCbor), NOW, &lim()),
        Ok(expected.clone())
    );
    assert_eq!(sniff(SENML_CBOR), Some(ContentType::SenmlCbor));
    assert_eq!(decode(SENML_CBOR, None, NOW, &lim()), Ok(expected));
    // bt as tag 1 plus relative t, bv applied, NaN values accepted.
    let b = [
        0x81, 0xa5, 0x22, 0xc1, 0x1a, 0x5f, 0x5e, 0x10, 0x00, 0x24, 0x0a, 0x00, 0x61, b'n', 0x06,
        0x20, 0x02, 0xf9, 0x7e, 0x00,
    ];
    let pts = decode(&b, Some(ContentType::SenmlCbor), NOW, &lim()).unwrap();
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0].ts_ms, 1_599_999_999_000);
    assert!(matches!(pts[0].value, Value::F64(v) if v.is_nan()));
}

// ---- JSON flattening ----

#[test]
fn json_flattening() {
    let p = r#"{"engine":{"temp":90,"on":true,"mode":"eco","x":null},
               "arr":[1,2.5,"s",[7]],"z":-3}"#;
    assert_eq!(
        dec(p, Some(ContentType::Json)),
        Ok(vec![
            pt("arr.0", NOW, f(1.0)),
            pt("arr.1", NOW, f(2.5)),
            pt("arr.2", NOW, Value::Str("s".into())),
            pt("arr.3.0", NOW, f(7.0)),
            pt("engine.mode", NOW, Value::Str("eco".into())),
            pt("engine.on", NOW, Value::Bool(true)),
            pt("engine.temp", NOW, f(90.0)),
            pt("z", NOW, f(-3.0)),
        ])
    );
    assert_eq!(sniff(p.as_bytes()), Some(ContentType::Json));
}

#[test]
fn json_batch_and_ts() {
    let p =
        r#"[{"ts":1000,"a":1},{"ts":"2013-03-21T22:04:00.5+02:00","a":2},{"a":3,"b":{"ts":4}}]"#;
    assert_eq!(sniff(p.as_bytes()), Some(ContentType::Json));
    assert_eq!(
        dec(p, None),
        Ok(vec![
            pt("a", 1000, f(1.0)),
            pt("a", 1_363_896_240_500, f(2.0)),
            pt("a", NOW, f(3.0)),
            pt("b.ts", NOW, f(4.0)),
        ])
    );
    assert_eq!(
        dec(r#"{"ts":"2013-03-21T15:34:00-04:30","a":1}"#, None).unwrap()[0].ts_ms,
        1_363_896_240_000
    );
}

#[test]
fn json_errors() {
    let j = Some(ContentType::Json);
    assert!(matches!(dec("{", j), Err(DecodeError::InvalidJson(_))));
    assert_eq!(
        dec("42", j),
        Err(DecodeError::NotAnObject(
            "payload must be an object or an array of objects"
        ))
    );
    assert!(matches!(dec("[1]", j), Err(DecodeError::NotAnObject(_))));
    assert!(matches!(
        dec(r#"{"ts":true,"a":1}"#, j),
        Err(DecodeError::BadTimestamp(_))
    ));
    assert!(matches!(
        dec(r#"{"ts":"yesterday","a":1}"#, j),
        Err(DecodeError::BadTimestamp(_))
    ));
    assert!(matches!(
        dec(r#"{"ts":1e300,"a":1}"#, j),
        Err(DecodeError::BadTimestamp(_))
    ));
    assert!(matches!(
        dec(r#"{"a":1e999}"#, j),
        Err(DecodeError::InvalidJson(_))
    ));
    assert!(matches!(
        dec(r#"{"a":NaN}"#, j),
        Err(DecodeError::InvalidJson(_))
    ));
    assert_eq!(dec(r#"{"":1}"#, j), Err(DecodeError::EmptyMetricName));
    assert_eq!(dec("", j), Err(DecodeError::Empty));
    assert_eq!(dec("{}", j), Ok(vec![]));
}

// ---- Plain CBOR ----

#[test]
fn cbor_map_flattening() {
    // {"ts": 1(1600000000), "e": {"t": 90.5(f32)}, 7: "x", "b": h'01', "n": null}
    let b = [
        0xa5, 0x62, b't', b's', 0xc1, 0x1a, 0x5f, 0x5e, 0x10, 0x00, 0x61, b'e', 0xa1, 0x61, b't',
        0xfa, 0x42, 0xb5, 0x00, 0x00, 0x07, 0x61, b'x', 0x61, b'b', 0x41, 0x01, 0x61, b'n', 0xf6,
    ];
    assert_eq!(sniff(&b), Some(ContentType::Cbor));
    let ts = 1_600_000_000_000;
    let expected = vec![pt("e.t", ts, f(90.5)), pt("7", ts, Value::Str("x".into()))];
    assert_eq!(decode(&b, None, NOW, &lim()), Ok(expected.clone()));
    assert_eq!(
        decode(&b, Some(ContentType::Cbor), NOW, &lim()),
        Ok(expected)
    );
    // Infinity is accepted from CBOR.
    let inf = [0xa1, 0x61, b'a', 0xf9, 0xfc, 0x00];
    assert_eq!(
        decode(&inf, None, NOW, &lim()),
        Ok(vec![pt("a", NOW, f(f64::NEG_INFINITY))])
    );
    assert!(matches!(
        decode(&[0xa1, 0x61], Some(ContentType::Cbor), NOW, &lim()),
        Err(DecodeError::InvalidCbor(_))
    ));
    assert!(matches!(
        decode(&[0x01], Some(ContentType::Cbor), NOW, &lim()),
        Err(DecodeError::NotAnObject(_))
    ));
}

// ---- Plain numbers ----

#[test]
fn plain_numbers() {
    for (s, v) in [
        ("21.5", 21.5),
        ("-3", -3.0),
        ("1e3", 1000.0),
        (" +0.5E-1\n", 0.05),
    ] {
        assert_eq!(sniff(s.as_bytes()), Some(ContentType::PlainNumber), "{s}");
        assert_eq!(dec(s, None), Ok(vec![pt("value", NOW, f(v))]));
        assert_eq!(
            dec(s, Some(ContentType::PlainNumber)),
            Ok(vec![pt("value", NOW, f(v))])
        );
    }
    for s in [
        "NaN", "inf", "1e999", "1.", ".5", "0x10", "1 2", "--1", "hello",
    ] {
        assert!(
            matches!(
                dec(s, Some(ContentType::PlainNumber)),
                Err(DecodeError::InvalidNumber(_))
            ),
            "{s}"
        );
        assert_eq!(sniff(s.as_bytes()), None, "{s}");
    }
    assert_eq!(dec("   ", None), Err(DecodeError::Empty));
    assert_eq!(dec("hello", None), Err(DecodeError::UnknownFormat));
}

// ---- Sniffing and MIME ----

#[test]
fn sniffing_and_mime() {
    assert_eq!(sniff(b""), None);
    assert_eq!(
        sniff(b"  [{\"n\":\"a\",\"v\":1}]"),
        Some(ContentType::SenmlJson)
    );
    assert_eq!(
        sniff(b"[{\"n\":\"a\",\"v\":1,\"extra\":2}]"),
        Some(ContentType::Json)
    );
    assert_eq!(sniff(b"[]"), Some(ContentType::Json));
    assert_eq!(sniff(b"[{\"u\":\"V\"}]"), Some(ContentType::Json));
    assert_eq!(sniff(&[0xa0]), Some(ContentType::Cbor));
    assert_eq!(sniff(&[0x80]), Some(ContentType::Cbor));
    assert_eq!(sniff(&[0xd9, 0xd9, 0xf7, 0xa0]), Some(ContentType::Cbor));
    assert_eq!(sniff(&[0x01]), None);
    use ContentType::*;
    for (m, ct) in [
        ("application/json", Json),
        ("application/senml+json", SenmlJson),
        ("application/senml+cbor", SenmlCbor),
        ("application/cbor", Cbor),
        ("text/plain; charset=utf-8", PlainNumber),
        ("Application/JSON", Json),
    ] {
        assert_eq!(ContentType::from_mime(m), Some(ct), "{m}");
    }
    assert_eq!(ContentType::from_mime("image/png"), None);
}

// ---- Limits ----

fn nested_json(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

#[test]
fn depth_limit() {
    assert!(dec(&nested_json(16), None).is_ok());
    assert_eq!(dec(&nested_json(17), None), Err(DecodeError::TooDeep));
    assert!(matches!(
        dec(&nested_json(500), None),
        Err(DecodeError::InvalidJson(_))
    ));
    let mut cbor = [0xa1, 0x61, b'a'].repeat(16);
    cbor.push(0x01);
    assert!(decode(&cbor, None, NOW, &lim()).is_ok());
    let mut cbor = [0xa1, 0x61, b'a'].repeat(17);
    cbor.push(0x01);
    assert_eq!(decode(&cbor, None, NOW, &lim()), Err(DecodeError::TooDeep));
    let huge = Limits {
        max_depth: usize::MAX,
        ..lim()
    };
    assert_eq!(
        decode(&[0x81; 10_000], None, NOW, &huge),
        Err(DecodeError::TooDeep)
    );
}

#[test]
fn point_and_name_limits() {
    let small = Limits {
        max_points: 2,
        max_depth: 16,
        max_metric_len: 5,
    };
    let d = |s: &str| decode(s.as_bytes(), None, NOW, &small);
    assert_eq!(d(r#"{"a":1,"b":2}"#).map(|p| p.len()), Ok(2));
    assert_eq!(d(r#"{"a":[1,2,3]}"#), Err(DecodeError::TooManyPoints(2)));
    assert_eq!(
        d(r#"[{"n":"a","v":1},{"n":"a","v":1},{"n":"a","v":1}]"#),
        Err(DecodeError::TooManyPoints(2))
    );
    assert_eq!(d(r#"{"abcde":1}"#).map(|p| p.len()), Ok(1));
    assert_eq!(d(r#"{"abc":{"de":1}}"#), Err(DecodeError::MetricTooLong(5)));
    assert_eq!(
        d(r#"[{"bn":"abc","n":"def","v":1}]"#),
        Err(DecodeError::MetricTooLong(5))
    );
}

#[test]
fn error_messages() {
    assert_eq!(
        DecodeError::TooManyPoints(3).to_string(),
        "payload has more than 3 points"
    );
    assert_eq!(
        DecodeError::InvalidSenml("record 0 has no name".into()).to_string(),
        "invalid SenML: record 0 has no name"
    );
}

// ---- Properties ----

#[derive(Debug, Clone)]
enum Tree {
    Num(f64),
    Bool(bool),
    Str(String),
    Obj(Vec<(String, Tree)>),
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(Tree::Num),
        any::<i32>().prop_map(|i| Tree::Num(f64::from(i))),
        any::<bool>().prop_map(Tree::Bool),
        "\\PC{0,12}".prop_map(Tree::Str),
    ];
    leaf.prop_recursive(3, 40, 6, |inner| {
        prop::collection::btree_map("k[a-z0-9_]{0,6}", inner, 0..6)
            .prop_map(|m| Tree::Obj(m.into_iter().collect()))
    })
}

fn to_json(t: &Tree) -> serde_json::Value {
    match t {
        Tree::Num(x) => serde_json::json!(x),
        Tree::Bool(b) => serde_json::json!(b),
        Tree::Str(s) => serde_json::json!(s),
        Tree::Obj(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

fn expected(prefix: &str, t: &Tree, out: &mut Vec<Point>) {
    let v = match t {
        Tree::Num(x) => Value::F64(*x),
        Tree::Bool(b) => Value::Bool(*b),
        Tree::Str(s) => Value::Str(s.clone()),
        Tree::Obj(m) => {
            for (k, v) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                expected(&name, v, out);
            }
            return;
        }
    };
    out.push(pt(prefix, NOW, v));
}

proptest! {
    #[test]
    fn json_objects_flatten(m in prop::collection::btree_map("k[a-z0-9_]{0,6}", tree(), 0..8)) {
        let t = Tree::Obj(m.into_iter().collect());
        let text = serde_json::to_string(&to_json(&t)).unwrap();
        let mut want = Vec::new();
        expected("", &t, &mut want);
        want.sort_by(|a, b| a.metric.cmp(&b.metric));
        for ct in [None, Some(ContentType::Json)] {
            let mut got = decode(text.as_bytes(), ct, NOW, &lim()).unwrap();
            got.sort_by(|a, b| a.metric.cmp(&b.metric));
            prop_assert_eq!(&got, &want);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        crate::fuzz::decode_all(&data);
    }

    #[test]
    fn cbor_shaped_bytes_never_panic(
        head in prop::sample::select(vec![0x81u8, 0x9f, 0xa1, 0xbf, 0xc1, 0xd9, 0x82, 0xa2]),
        data in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut b = vec![head];
        b.extend(data);
        crate::fuzz::decode_all(&b);
    }

    #[test]
    fn text_bytes_never_panic(s in "[\\[\\]{}\":,0-9a-z.eE+ -]{0,64}") {
        crate::fuzz::decode_all(s.as_bytes());
    }
}

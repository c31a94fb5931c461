use super::*;

fn attach(args: &[&str]) -> Result<Box<AttachArgs>, clap::Error> {
    let mut argv = vec!["mirror-agent", "attach", "--iface", "eth0", "--port", "80"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv)?.command {
        Command::Attach(a) => Ok(a),
        _ => unreachable!("parsed as attach"),
    }
}

#[test]
fn replay_arguments_and_their_errors() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["mirror-agent", "replay", "rec", "--mirror", "http://m:80"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Replay(r) => r,
            _ => unreachable!("parsed as replay"),
        })
    };
    use crate::record::playback::{Lanes, Speed};
    let r = parse(&[]).unwrap();
    assert_eq!(
        (r.speed, r.loops, r.connections),
        (Speed::Factor(1.0), 1, Lanes::Same)
    );
    let r = parse(&["--speed", "max", "--loop", "3", "--connections", "8"]).unwrap();
    assert_eq!(
        (r.speed, r.loops, r.connections),
        (Speed::Max, 3, Lanes::Fixed(8))
    );
    for bad in [
        ["--speed", "0"],
        ["--speed", "fast"],
        ["--connections", "0"],
        ["--loop", "0"],
    ] {
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains(bad[1]), "{bad:?}: {e}");
    }
}

#[test]
fn mirrors_by_name_or_bare_url() {
    let a = attach(&[
        "--mirror",
        "cand=http://v5:8080",
        "--mirror",
        "http://v1:8080/x?a=b",
        "--mirror-label",
        "V1MIR",
    ])
    .unwrap();
    assert_eq!(
        a.mirror,
        [
            MirrorArg {
                name: Some("cand".into()),
                url: "http://v5:8080".into()
            },
            MirrorArg {
                name: None,
                url: "http://v1:8080/x?a=b".into()
            },
        ]
    );
    assert_eq!(
        mirror_names(&a.mirror, &a.series.mirror_label, &a.series.live_label).unwrap(),
        ["cand", "V1MIR"]
    );

    let err = attach(&["--mirror", "bad name=http://x"]).unwrap_err();
    assert!(err.to_string().contains("letters, digits"), "{err}");
    let two_bare = attach(&["--mirror", "http://a", "--mirror", "http://b"]).unwrap();
    let err = mirror_names(&two_bare.mirror, "mirror", "live").unwrap_err();
    assert!(err.contains("give each a name"), "{err}");
    let same = attach(&["--mirror", "a=http://a", "--mirror", "a=http://b"]).unwrap();
    assert!(mirror_names(&same.mirror, "mirror", "live").is_err());
    let live = attach(&["--mirror", "live=http://a"]).unwrap();
    assert!(mirror_names(&live.mirror, "mirror", "live").is_err());
}

//! deploy/docker/Dockerfile cannot be built here (no Docker engine), so what
//! can be checked without one is: every path it copies from the context
//! exists, the packages and binaries it names are the workspace's, each
//! runtime stage runs the binary it copied, the build image has what the
//! build scripts need, and the chart's image names are its targets.

use std::collections::BTreeMap;

use deploy_tests::workspace;

#[derive(Debug)]
struct Stage {
    base: String,
    /// (instruction, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn dockerfile() -> (Vec<String>, BTreeMap<String, Stage>) {
    let text = std::fs::read_to_string(workspace().join("deploy/docker/Dockerfile")).unwrap();
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(t);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut order = Vec::new();
    let mut stages: BTreeMap<String, Stage> = BTreeMap::new();
    for l in logical {
        let (instr, args) = l.split_once(' ').unwrap_or((&l, ""));
        let instr = instr.to_uppercase();
        if instr == "FROM" {
            let parts: Vec<&str> = args.split_whitespace().collect();
            assert!(
                parts.len() == 3 && parts[1].eq_ignore_ascii_case("AS"),
                "every stage is named: FROM {args}"
            );
            let name = parts[2].to_string();
            assert!(!stages.contains_key(&name), "stage {name} twice");
            order.push(name.clone());
            stages.insert(
                name,
                Stage {
                    base: parts[0].to_string(),
                    instructions: Vec::new(),
                },
            );
        } else {
            let name = order.last().expect("an instruction before FROM");
            stages
                .get_mut(name)
                .unwrap()
                .instructions
                .push((instr, args.trim().to_string()));
        }
    }
    (order, stages)
}

/// The root manifest's `members = [...]` line (one line, as it is written).
fn workspace_members() -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members line");
    let list = line.split_once('[').unwrap().1.split(']').next().unwrap();
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

const BINARIES: [&str; 3] = ["istiod-lite", "ztunnel", "waypoint"];

#[test]
fn every_binary_has_a_stage_that_runs_what_it_copied() {
    let (order, stages) = dockerfile();
    let members = workspace_members();
    for bin in BINARIES {
        // A binary crate named as its package, with a main.
        assert!(
            members.contains(&bin.to_string()),
            "{bin} is a workspace member"
        );
        assert!(
            workspace().join(bin).join("src/main.rs").exists(),
            "{bin}/src/main.rs"
        );
        let stage = stages
            .get(bin)
            .unwrap_or_else(|| panic!("a stage (target) named {bin}"));
        let copies: Vec<&String> = stage
            .instructions
            .iter()
            .filter(|(i, _)| i == "COPY")
            .map(|(_, a)| a)
            .collect();
        let copied = copies
            .iter()
            .find_map(|a| {
                let parts: Vec<&str> = a.split_whitespace().collect();
                (parts[0] == "--from=builder" && parts[1] == format!("/out/{bin}"))
                    .then(|| parts[2].to_string())
            })
            .unwrap_or_else(|| panic!("stage {bin} copies /out/{bin} from the builder"));
        let entrypoint = stage
            .instructions
            .iter()
            .find(|(i, _)| i == "ENTRYPOINT")
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("stage {bin} has an ENTRYPOINT"));
        assert_eq!(entrypoint, format!("[\"{copied}\"]"), "stage {bin}");
        assert!(
            order.iter().position(|s| s == "builder") < order.iter().position(|s| s == bin),
            "builder comes before {bin}"
        );
    }
    // The builder builds exactly these packages and puts them in /out.
    let builder = &stages["builder"];
    let run = builder
        .instructions
        .iter()
        .find(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a.clone())
        .expect("a cargo build");
    // The image ships the `dist` profile (whole-program LTO, the one the
    // benchmark figures are taken with), which the workspace must define.
    assert!(
        run.contains("--locked") && run.contains("--profile dist"),
        "{run}"
    );
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        manifest.contains("[profile.dist]"),
        "the workspace defines the dist profile"
    );
    let cargo = run[run.find("cargo build").unwrap()..]
        .split("&&")
        .next()
        .unwrap();
    let packages: Vec<&str> = cargo
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    let mut sorted = packages.clone();
    sorted.sort();
    let mut want = BINARIES.to_vec();
    want.sort();
    assert_eq!(sorted, want);
    for bin in BINARIES {
        assert!(run.contains(&format!("target/dist/{bin}")), "{run}");
        assert!(run.contains(&format!("/out/{bin}")), "{run}");
    }
}

#[test]
fn context_paths_exist_and_target_stays_out() {
    let (order, stages) = dockerfile();
    for name in &order {
        for (instr, args) in &stages[name].instructions {
            if instr != "COPY" && instr != "ADD" {
                continue;
            }
            assert_eq!(instr, "COPY", "ADD fetches and unpacks: COPY is meant");
            let parts: Vec<&str> = args.split_whitespace().collect();
            if let Some(from) = parts[0].strip_prefix("--from=") {
                let at = order.iter().position(|s| s == from);
                assert!(
                    at.is_some_and(|i| i < order.iter().position(|s| s == name).unwrap()),
                    "COPY --from={from} in {name}: no earlier stage of that name"
                );
                continue;
            }
            for src in &parts[..parts.len() - 1] {
                assert!(!src.starts_with("--"), "COPY flag {src} not checked here");
                assert!(
                    workspace().join(src).exists(),
                    "COPY {src} in stage {name}: not in the workspace"
                );
            }
        }
    }
    let ignore =
        std::fs::read_to_string(workspace().join("deploy/docker/Dockerfile.dockerignore")).unwrap();
    for must in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == must),
            "{must} is ignored"
        );
    }
}

#[test]
fn builder_matches_the_toolchain_and_the_build_scripts_needs() {
    let (_, stages) = dockerfile();
    let builder = &stages["builder"];
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let rust_version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("workspace rust-version");
    assert_eq!(builder.base, format!("rust:{rust_version}-bookworm"));
    let apt: String = builder
        .instructions
        .iter()
        .filter(|(i, a)| i == "RUN" && a.contains("apt-get install"))
        .map(|(_, a)| a.clone())
        .collect();
    // What the build scripts call, and the Debian packages that provide it
    // (scripts/setup.sh installs the same ones for local builds).
    let setup = std::fs::read_to_string(workspace().join("scripts/setup.sh")).unwrap();
    for (script, tool, packages) in [
        (
            "ebpf-redirect/build.rs",
            "clang",
            &["clang", "llvm", "libbpf-dev"][..],
        ),
        (
            "mesh-core/build.rs",
            "protoc",
            &["protobuf-compiler", "libprotobuf-dev"][..],
        ),
    ] {
        let src = std::fs::read_to_string(workspace().join(script)).unwrap();
        assert!(
            src.contains(tool),
            "{script} no longer uses {tool}: update the builder"
        );
        for p in packages {
            assert!(
                apt.split_whitespace().any(|w| w == *p),
                "the builder must install {p} for {script}"
            );
            assert!(setup.contains(p), "scripts/setup.sh installs {p} too");
        }
    }
}

#[test]
fn runtime_images_are_minimal_and_non_root_where_they_can_be() {
    let (_, stages) = dockerfile();
    for bin in ["istiod-lite", "waypoint"] {
        let s = &stages[bin];
        assert!(
            s.base.starts_with("gcr.io/distroless/cc-debian12"),
            "{bin}: {}",
            s.base
        );
        let user = s
            .instructions
            .iter()
            .find(|(i, _)| i == "USER")
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("{bin} sets USER"));
        let uid = user.split(':').next().unwrap();
        assert!(uid != "0" && uid != "root", "{bin} runs as {user}");
        assert!(
            !s.instructions.iter().any(|(i, _)| i == "RUN"),
            "{bin}: distroless has no shell to RUN with"
        );
    }
    // ztunnel's capture shells out to `ip`: its image must carry iproute2.
    let runs_ip = ["ebpf-redirect/src", "ztunnel/src"].iter().any(|d| {
        std::fs::read_dir(workspace().join(d)).unwrap().any(|e| {
            let p = e.unwrap().path();
            p.extension().is_some_and(|x| x == "rs")
                && std::fs::read_to_string(&p)
                    .unwrap()
                    .contains("Command::new(\"ip\")")
        })
    });
    let z = &stages["ztunnel"];
    let installs_iproute2 = z
        .instructions
        .iter()
        .any(|(i, a)| i == "RUN" && a.split_whitespace().any(|w| w == "iproute2"));
    assert_eq!(
        installs_iproute2, runs_ip,
        "ztunnel's image carries iproute2 exactly when its code runs `ip`"
    );
}

#[test]
fn chart_images_are_the_dockerfile_targets() {
    let (_, stages) = dockerfile();
    let values: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(workspace().join("deploy/helm/ambit/values.yaml")).unwrap(),
    )
    .unwrap();
    for (key, target) in [
        ("istiod", "istiod-lite"),
        ("ztunnel", "ztunnel"),
        ("waypoint", "waypoint"),
    ] {
        assert_eq!(values[key]["image"], target, "values {key}.image");
        assert!(stages.contains_key(target));
    }
}

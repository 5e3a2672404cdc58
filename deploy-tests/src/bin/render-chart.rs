//! Prints the chart as `helm template` would, with the in-process renderer,
//! for reading what the tests check where Helm is not installed:
//!
//!     cargo run -q -p deploy-tests --bin render-chart -- [NAMESPACE] [OVERRIDE.yaml]

use deploy_tests::chart::Chart;
use deploy_tests::objects::parse;

fn main() {
    let mut args = std::env::args().skip(1);
    let namespace = args.next().unwrap_or_else(|| "istio-system".into());
    let over: serde_json::Value = match args.next() {
        Some(path) => {
            let text =
                std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("{path}: {e}")));
            serde_yaml::from_str(&text).unwrap_or_else(|e| fail(&format!("{path}: {e}")))
        }
        None => serde_json::json!({}),
    };
    let chart = Chart::load(&deploy_tests::workspace().join("deploy/helm/ambit"))
        .unwrap_or_else(|e| fail(&e));
    let docs = chart
        .render("ambit", &namespace, &over)
        .unwrap_or_else(|e| fail(&e));
    for d in &docs {
        // The same check the tests make: nothing printed that would not load.
        parse(d).unwrap_or_else(|e| fail(&e));
        print!("---\n# Source: {}\n{}", d.source, d.yaml);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("render-chart: {msg}");
    std::process::exit(1)
}

//! `tiergate bench`'s engine, run against a live tiergate on the real fast model.

mod common;

use common::TestServer;
use tiergate::loadgen::{self, BenchOptions, Load};

#[tokio::test]
async fn closed_and_open_loops_report_every_request_with_its_ttft() {
    let server = TestServer::fast().await;
    let mut options = BenchOptions::new(
        server.base.clone(),
        vec!["auto".to_owned()],
        vec![Load::Closed { concurrency: 2 }, Load::Open { rate: 20.0 }],
    );
    options.requests = Some(5);
    options.max_tokens = 8;
    options.seed = Some(7);
    options.ttft_budget = Some(std::time::Duration::from_secs(60));
    let report = loadgen::run(options).await.expect("bench runs");

    assert_eq!(report.models.len(), 1);
    let levels = &report.models[0].levels;
    assert_eq!(levels.len(), 2);
    for level in levels {
        assert_eq!((level.requests, level.ok), (5, 5), "{level:?}");
        assert_eq!(level.statuses.get("200"), Some(&5), "{level:?}");
        let ttft = level.ttft_ms.as_ref().expect("ttft measured");
        // The smallest TTFT is above zero, so every one is.
        assert!(ttft.min > 0.0, "{ttft:?}");
        assert!(ttft.max >= ttft.p50, "{ttft:?}");
        // Eight tokens each (ignore_eos), counted from the usage chunk.
        assert_eq!(level.completion_tokens, 40, "{level:?}");
        assert!(level.inter_token_ms.as_ref().expect("gaps").min >= 0.0);
        // tiergate's own headers are picked up.
        assert_eq!(level.tiers.get("fast"), Some(&5), "{level:?}");
        let budget = level.budget.as_ref().expect("budget asked for");
        assert_eq!((budget.admitted, budget.met), (5, 5));
    }
    assert_eq!(levels[1].load, Load::Open { rate: 20.0 });
    let table = loadgen::table(&report).to_string();
    for expected in ["2 concurrent", "20/s Poisson", "fast: 5", "200: 5"] {
        assert!(table.contains(expected), "{expected} missing from\n{table}");
    }
    server.stop().await;
}

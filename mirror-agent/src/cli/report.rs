//! `mirror-agent report`'s arguments: one agent, or the fleet through Prometheus.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::GateArgs;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The agent's --metrics address.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub agent: SocketAddr,
    /// The whole fleet instead of one agent: Prometheus's address, which scrapes every node's
    /// agent (e.g. http://prometheus.monitoring:9090).
    #[arg(long, value_name = "URL", conflicts_with = "agent")]
    pub prometheus: Option<String>,
    /// With --prometheus: label matchers that pick the agents' series, without braces
    /// (e.g. 'job="mirror-agent",namespace="shop"').
    #[arg(
        long,
        value_name = "MATCHERS",
        requires = "prometheus",
        default_value = ""
    )]
    pub selector: String,
    /// With --prometheus: the window the table covers, ending now (s, m, h or d: 10m, 1h).
    #[arg(long, value_name = "DURATION", requires = "prometheus", default_value = "10m", value_parser = parse_window)]
    pub window: std::time::Duration,
    /// With --prometheus: also write the fleet's page (the table, verdicts and latency charts)
    /// to FILE.
    #[arg(long, value_name = "FILE", requires = "prometheus")]
    pub html: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    /// A declared mirroring's report (NAMESPACE/NAME) instead of the --mirror's; with
    /// --prometheus, needed when the agents report several.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub mirroring: Option<String>,

    #[command(flatten)]
    pub gate: GateArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
}

/// What is redacted before anything is kept or shown: recordings (and so their HAR exports)
/// and the examples of content diffs.
/// `90s`, `10m`, `2h`, `1d`: a window of at least a second.
fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    let fail = || format!("{s:?}: give a number and a unit, s, m, h or d (e.g. 10m)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(fail)?;
    let n: u64 = s[..split].parse().map_err(|_| fail())?;
    let unit = match &s[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(fail()),
    };
    if n == 0 {
        return Err(fail());
    }
    Ok(std::time::Duration::from_secs(n * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_a_number_and_a_unit() {
        assert_eq!(parse_window("90s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_window("10m"), Ok(std::time::Duration::from_secs(600)));
        assert_eq!(
            parse_window("1d"),
            Ok(std::time::Duration::from_secs(86400))
        );
        for bad in ["10", "0m", "m", "1x", "-1m"] {
            assert!(parse_window(bad).unwrap_err().contains("e.g. 10m"), "{bad}");
        }
    }
}

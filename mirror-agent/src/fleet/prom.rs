//! A client of Prometheus's HTTP API (`/api/v1/query`): instant vectors and raw range vectors.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::FleetError;
use crate::capture::error::chain as error_chain;
use crate::replay::rewrite::percent_encode as encode;

/// A series' labels, `__name__` left out.
pub type Labels = BTreeMap<String, String>;

/// How long one query may take before the report gives up on Prometheus.
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: Labels,
    pub value: f64,
}

/// One series of a range vector: its raw samples (Unix seconds, value), oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: Labels,
    pub values: Vec<(f64, f64)>,
}

/// Prometheus at a base URL (`http://prometheus:9090`, or with a path prefix).
pub struct Prometheus {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// The report asks only for vectors and matrices.
#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<VectorItem>),
    Matrix(Vec<MatrixItem>),
}

#[derive(Deserialize)]
struct VectorItem {
    metric: Labels,
    value: (f64, String),
}

#[derive(Deserialize)]
struct MatrixItem {
    metric: Labels,
    values: Vec<(f64, String)>,
}

impl Prometheus {
    /// Refuses what is not an `http://` URL, naming the fix.
    pub fn new(url: &str) -> Result<Prometheus, FleetError> {
        let base = url.trim_end_matches('/').to_string();
        if base.starts_with("https://") {
            return Err(FleetError::Https(url.to_string()));
        }
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| FleetError::BadUrl(url.to_string()))?;
        if rest.is_empty() || base.parse::<hyper::Uri>().is_err() {
            return Err(FleetError::BadUrl(url.to_string()));
        }
        Ok(Prometheus {
            base,
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// An instant query at `time` (Unix seconds).
    pub async fn vector(&self, promql: &str, time: f64) -> Result<Vec<Sample>, FleetError> {
        match self.query(promql, time).await? {
            Data::Vector(items) => items
                .into_iter()
                .map(|i| {
                    Ok(Sample {
                        value: number(&i.value.1, promql)?,
                        labels: without_name(i.metric),
                    })
                })
                .collect(),
            _ => Err(FleetError::Unexpected {
                query: promql.to_string(),
                what: "not an instant vector".into(),
            }),
        }
    }

    /// A range selector's raw samples at `time` (`metric{…}[10m]`).
    pub async fn matrix(&self, promql: &str, time: f64) -> Result<Vec<Series>, FleetError> {
        match self.query(promql, time).await? {
            Data::Matrix(items) => items
                .into_iter()
                .map(|i| {
                    let values = i
                        .values
                        .iter()
                        .map(|(t, v)| Ok((*t, number(v, promql)?)))
                        .collect::<Result<_, _>>()?;
                    Ok(Series {
                        labels: without_name(i.metric),
                        values,
                    })
                })
                .collect(),
            _ => Err(FleetError::Unexpected {
                query: promql.to_string(),
                what: "not a range vector".into(),
            }),
        }
    }

    async fn query(&self, promql: &str, time: f64) -> Result<Data, FleetError> {
        let uri = format!(
            "{}/api/v1/query?query={}&time={time:.3}",
            self.base,
            encode(promql)
        );
        let uri: hyper::Uri = uri
            .parse()
            .map_err(|_| FleetError::BadUrl(self.base.clone()))?;
        let unreachable = |reason: String| FleetError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let resp = tokio::time::timeout(QUERY_TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| unreachable(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status();
        let body = tokio::time::timeout(QUERY_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| unreachable(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(|e| unreachable(error_chain(&e)))?
            .to_bytes();
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| FleetError::NotPrometheus {
                url: self.base.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            })?;
        if answer.status != "success" {
            return Err(FleetError::Refused {
                query: promql.to_string(),
                kind: answer.error_type.unwrap_or_default(),
                error: answer.error.unwrap_or_default(),
            });
        }
        answer.data.ok_or_else(|| FleetError::Unexpected {
            query: promql.to_string(),
            what: "no data".into(),
        })
    }
}

fn without_name(mut labels: Labels) -> Labels {
    labels.remove("__name__");
    labels
}

/// Prometheus writes sample values as strings: numbers, `NaN`, `+Inf`.
fn number(v: &str, query: &str) -> Result<f64, FleetError> {
    v.parse().map_err(|_| FleetError::Unexpected {
        query: query.to_string(),
        what: format!("the value {v:?} is not a number"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_percent_encoded() {
        assert_eq!(
            encode(r#"sum by (le) (x{a="b c/d"}[5m])"#),
            "sum%20by%20%28le%29%20%28x%7Ba%3D%22b%20c%2Fd%22%7D%5B5m%5D%29"
        );
    }

    #[test]
    fn urls_that_cannot_work_are_refused_with_the_fix() {
        assert!(matches!(
            Prometheus::new("https://prom:9090"),
            Err(FleetError::Https(_))
        ));
        assert!(matches!(
            Prometheus::new("prom:9090"),
            Err(FleetError::BadUrl(_))
        ));
        assert_eq!(
            Prometheus::new("http://prom:9090/prometheus/")
                .unwrap()
                .url(),
            "http://prom:9090/prometheus"
        );
    }

    #[test]
    fn answers_decode_as_vectors_matrices_and_errors() {
        let v: Answer = serde_json::from_str(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"x","a":"1"},"value":[1.5,"+Inf"]}]}}"#,
        )
        .unwrap();
        assert!(matches!(v.data, Some(Data::Vector(ref i)) if i[0].value.1 == "+Inf"));
        let m: Answer = serde_json::from_str(
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"a":"1"},"values":[[1,"2"],[2,"3"]]}]}}"#,
        )
        .unwrap();
        assert!(matches!(m.data, Some(Data::Matrix(ref i)) if i[0].values.len() == 2));
        let e: Answer = serde_json::from_str(
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap();
        assert_eq!(e.error.as_deref(), Some("parse error"));
        assert_eq!(number("+Inf", "q").unwrap(), f64::INFINITY);
    }
}

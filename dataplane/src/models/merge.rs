//! The fleet's model list: what each replica answered on its own `/v1/models`,
//! merged into one list deduplicated by `id`.
//!
//! Pure functions over parsed answers, so every rule (dedup, pinning, refusal,
//! garbage) is unit-tested here rather than through processes.

use std::collections::HashSet;

use serde_json::{Map, Value};

/// `owned_by` of a model object kvroute fills in itself.
pub const OWNER: &str = "kvroute";

/// What one replica's `GET /v1/models` came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Listing {
    /// A 2xx answer with a `data` array: the valid model objects in it, in order.
    Models(Vec<Model>),
    /// A 404 or 405: the replica answers HTTP but has no model list endpoint.
    Unlisted,
    /// A 401 or 403: the replica refused the client's credentials.
    Refused,
    /// No usable answer: connect error, timeout, 5xx, or a body that is not a list.
    Failed,
}

/// One model object in OpenAI's shape (`id`, `object`, `created`, `owned_by`,
/// plus whatever else the replica sent, such as vLLM's `max_model_len`).
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: String,
    pub fields: Map<String, Value>,
}

impl Model {
    /// A replica's model entry, with the fields OpenAI's SDKs require filled in
    /// where the replica left them out. `None` for an entry with no string `id`.
    fn from_entry(entry: &Value) -> Option<Model> {
        let mut fields = entry.as_object()?.clone();
        let id = fields
            .get("id")?
            .as_str()
            .filter(|s| !s.is_empty())?
            .to_owned();
        fields.insert("object".into(), Value::from("model"));
        if !fields.get("created").is_some_and(Value::is_u64) {
            fields.insert("created".into(), Value::from(0u64));
        }
        if !fields.get("owned_by").is_some_and(Value::is_string) {
            fields.insert("owned_by".into(), Value::from(OWNER));
        }
        Some(Model { id, fields })
    }

    /// A model a replica is configured to serve but does not list itself. Its
    /// creation time is unknown, hence `created: 0`.
    pub fn configured(id: &str) -> Model {
        let mut fields = Map::new();
        fields.insert("id".into(), Value::from(id));
        fields.insert("object".into(), Value::from("model"));
        fields.insert("created".into(), Value::from(0u64));
        fields.insert("owned_by".into(), Value::from(OWNER));
        Model {
            id: id.to_owned(),
            fields,
        }
    }

    pub fn to_json(&self) -> Value {
        Value::Object(self.fields.clone())
    }
}

/// Reads a replica's answer: its HTTP status and body.
pub fn parse_listing(status: u16, body: &[u8]) -> Listing {
    match status {
        200..=299 => {}
        401 | 403 => return Listing::Refused,
        404 | 405 => return Listing::Unlisted,
        _ => return Listing::Failed,
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Listing::Failed;
    };
    match v.get("data").and_then(Value::as_array) {
        Some(data) => Listing::Models(data.iter().filter_map(Model::from_entry).collect()),
        None => Listing::Failed,
    }
}

/// What the fleet serves, as the `/v1/models` routes answer it.
#[derive(Debug, Clone, PartialEq)]
pub enum Fleet {
    /// At least one replica answered; the union of their models (may be empty).
    Models(Vec<Model>),
    /// No replica answered, and at least one refused the client's credentials.
    Refused,
    /// No replica answered (or none is available).
    NoReplica,
}

impl Fleet {
    pub fn find(&self, id: &str) -> Option<&Model> {
        match self {
            Fleet::Models(list) => list.iter().find(|m| m.id == id),
            _ => None,
        }
    }
}

/// Merges the answers of the available replicas, each with the models it is
/// pinned to (`models` in its spec; empty means any), in replica-set order.
///
/// - A replica contributes only when it answered with a list, or, if it is
///   pinned, when it answered that it has no list endpoint (404/405): its
///   configuration then says what it serves.
/// - A pinned replica contributes only its pinned models: those it lists with
///   its own fields, the rest as [`Model::configured`] objects.
/// - Duplicates keep the first replica's object, and an object a replica listed
///   always wins over a configured one, so configured objects come last.
pub fn merge<'a>(answers: impl IntoIterator<Item = (&'a [String], Listing)>) -> Fleet {
    let answers: Vec<(&[String], Listing)> = answers.into_iter().collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let mut answered = false;
    for (pinned, listing) in &answers {
        match listing {
            Listing::Models(models) => {
                answered = true;
                for m in models {
                    let allowed = pinned.is_empty() || pinned.contains(&m.id);
                    if allowed && seen.insert(m.id.clone()) {
                        out.push(m.clone());
                    }
                }
            }
            Listing::Unlisted if !pinned.is_empty() => answered = true,
            _ => {}
        }
    }
    for (pinned, listing) in &answers {
        if matches!(listing, Listing::Models(_) | Listing::Unlisted) {
            for id in pinned.iter() {
                if seen.insert(id.clone()) {
                    out.push(Model::configured(id));
                }
            }
        }
    }
    if answered {
        Fleet::Models(out)
    } else if answers.iter().any(|(_, l)| *l == Listing::Refused) {
        Fleet::Refused
    } else {
        Fleet::NoReplica
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listing(body: Value) -> Listing {
        parse_listing(200, body.to_string().as_bytes())
    }

    fn vllm(ids: &[&str], owner: &str) -> Listing {
        let data: Vec<Value> = ids
            .iter()
            .map(|id| {
                json!({"id": id, "object": "model", "created": 1700000000u64,
                       "owned_by": owner, "max_model_len": 4096})
            })
            .collect();
        listing(json!({"object": "list", "data": data}))
    }

    fn ids(f: &Fleet) -> Vec<&str> {
        match f {
            Fleet::Models(l) => l.iter().map(|m| m.id.as_str()).collect(),
            other => panic!("no list: {other:?}"),
        }
    }

    const ANY: &[String] = &[];

    #[test]
    fn union_deduplicated_first_replica_wins() {
        let f = merge([
            (ANY, vllm(&["m1"], "a")),
            (ANY, vllm(&["m2", "m1"], "b")),
            (ANY, vllm(&["m3"], "c")),
        ]);
        assert_eq!(ids(&f), ["m1", "m2", "m3"]);
        let m1 = f.find("m1").unwrap();
        assert_eq!(m1.fields["owned_by"], "a");
        assert_eq!(m1.fields["max_model_len"], 4096);
        assert_eq!(f.find("m2").unwrap().fields["owned_by"], "b");
        assert!(f.find("m4").is_none());
    }

    #[test]
    fn failed_and_garbage_replicas_are_left_out() {
        let garbage = parse_listing(200, b"<html>hello</html>");
        assert_eq!(garbage, Listing::Failed);
        let no_data = listing(json!({"name": "a", "path": "/v1/models"}));
        assert_eq!(no_data, Listing::Failed);
        assert_eq!(parse_listing(503, b"{}"), Listing::Failed);
        let f = merge([
            (ANY, garbage),
            (ANY, Listing::Failed),
            (ANY, no_data),
            (ANY, vllm(&["m2"], "b")),
        ]);
        assert_eq!(ids(&f), ["m2"]);
    }

    #[test]
    fn invalid_entries_are_skipped_and_missing_fields_filled() {
        let l = listing(json!({"data": [
            {"id": "ok"}, {"id": ""}, {"id": 7}, "m", null, {"object": "model"},
            {"id": "typed", "object": "engine", "created": -5, "owned_by": null}
        ]}));
        let Listing::Models(ms) = &l else {
            panic!("{l:?}")
        };
        let got: Vec<&str> = ms.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(got, ["ok", "typed"]);
        for m in ms {
            assert_eq!(m.fields["object"], "model");
            assert_eq!(m.fields["created"], 0);
            assert_eq!(m.fields["owned_by"], OWNER);
        }
    }

    #[test]
    fn pinned_replica_contributes_only_its_configured_models() {
        let pinned = ["m2".to_string(), "alias".to_string()];
        let f = merge([
            // Lists m2 and m9, pinned to m2 and alias: m9 is not routed there.
            (&pinned[..], vllm(&["m9", "m2"], "b")),
            (ANY, vllm(&["m1"], "a")),
        ]);
        assert_eq!(ids(&f), ["m2", "m1", "alias"]);
        assert_eq!(f.find("m2").unwrap().fields["owned_by"], "b");
        assert_eq!(
            f.find("alias").unwrap().to_json(),
            Model::configured("alias").to_json()
        );
        assert!(f.find("m9").is_none());
    }

    #[test]
    fn listed_object_wins_over_configured_one() {
        let pinned = ["m1".to_string()];
        let f = merge([(&pinned[..], vllm(&["m5"], "c")), (ANY, vllm(&["m1"], "a"))]);
        assert_eq!(ids(&f), ["m1"]);
        assert_eq!(f.find("m1").unwrap().fields["owned_by"], "a");
    }

    #[test]
    fn pinned_replica_without_list_endpoint_still_counts() {
        let pinned = ["m7".to_string()];
        assert_eq!(parse_listing(404, b"Not Found"), Listing::Unlisted);
        let f = merge([(&pinned[..], Listing::Unlisted), (ANY, Listing::Unlisted)]);
        assert_eq!(ids(&f), ["m7"]);
        // An unpinned replica without the endpoint says nothing about its models.
        assert_eq!(merge([(ANY, Listing::Unlisted)]), Fleet::NoReplica);
        // Nor does a pinned one that failed.
        assert_eq!(merge([(&pinned[..], Listing::Failed)]), Fleet::NoReplica);
    }

    #[test]
    fn nobody_answering_is_no_replica_or_refused() {
        assert_eq!(merge([]), Fleet::NoReplica);
        assert_eq!(merge([(ANY, Listing::Failed)]), Fleet::NoReplica);
        assert_eq!(parse_listing(401, b""), Listing::Refused);
        assert_eq!(
            merge([(ANY, Listing::Failed), (ANY, Listing::Refused)]),
            Fleet::Refused
        );
        // One replica accepting the credentials is enough for a list.
        let f = merge([(ANY, Listing::Refused), (ANY, vllm(&["m1"], "a"))]);
        assert_eq!(ids(&f), ["m1"]);
        // An answered empty list is an empty list, not an outage.
        let f = merge([(ANY, listing(json!({"object": "list", "data": []})))]);
        assert_eq!(f, Fleet::Models(vec![]));
    }
}

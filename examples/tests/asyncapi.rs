//! The AsyncAPI document of the examples' topics is valid for the AsyncAPI
//! project's own parser (`@asyncapi/parser`, run with node; `scripts/dev.sh
//! up` installs it) and says what the relay actually publishes.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tidings::schema::AsyncApiInfo;

fn validator() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/asyncapi");
    assert!(
        dir.join("node_modules/@asyncapi/parser").is_dir(),
        "the AsyncAPI parser is not installed: run `scripts/dev.sh up` (it runs `npm ci` in {})",
        dir.display()
    );
    dir.join("validate.mjs")
}

/// Runs the parser over `document`: its exit status, and its summary line.
fn validate(document: &Value) -> (bool, Value, String) {
    let path = std::env::temp_dir().join(format!("tidings-asyncapi-{}.json", uuid::Uuid::now_v7()));
    std::fs::write(&path, serde_json::to_string_pretty(document).unwrap()).unwrap();
    let output = Command::new("node")
        .arg(validator())
        .arg(&path)
        .output()
        .expect("node runs (the machine's Node.js)");
    std::fs::remove_file(&path).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no summary from the parser: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    (output.status.success(), summary, stdout)
}

/// A list of strings from the parser's summary, sorted.
fn sorted(list: &Value) -> Vec<&str> {
    let mut items: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect();
    items.sort_unstable();
    items
}

fn document(prefix: &str) -> Value {
    let mut info = AsyncApiInfo::new("examples", "0.1.0");
    info.topic_prefix = prefix.into();
    tidings_examples::catalog().asyncapi(&info).unwrap()
}

#[test]
fn the_asyncapi_document_passes_the_asyncapi_parser_with_a_channel_per_topic_and_a_message_per_event_type()
 {
    let doc = document("");
    let (valid, summary, output) = validate(&doc);
    assert!(valid, "the parser refused the document:\n{output}");
    assert_eq!(summary["errors"], 0, "{output}");
    assert_eq!(summary["version"], "3.0.0");
    assert_eq!(sorted(&summary["channels"]), ["auctions", "orders"]);
    assert_eq!(
        sorted(&summary["messages"]),
        [
            "AuctionClosed",
            "AuctionOpened",
            "BidSubmitted",
            "OrderCancelled",
            "OrderCreated",
            "PaymentProcessed"
        ]
    );

    // OrderCreated at its current version 2 (v1 is upcast on read), as the
    // relay publishes it: the envelope around the event's schema, the
    // routing headers, the aggregate id as key.
    let message = &doc["components"]["messages"]["OrderCreated"];
    let envelope = &message["payload"]["properties"];
    assert_eq!(envelope["event_type"]["const"], "OrderCreated");
    assert_eq!(envelope["event_version"]["const"], 2);
    assert_eq!(
        envelope["payload"]["$ref"],
        "#/components/schemas/OrderCreated.v2"
    );
    let payload = &doc["components"]["schemas"]["OrderCreated.v2"];
    let expected = tidings::schema::schemas_of::<tidings_examples::orders::OrderEvent>()
        .into_iter()
        .find(|s| s.event_type == "OrderCreated" && s.version == 2)
        .unwrap();
    assert_eq!(
        payload["properties"],
        expected.schema.as_value()["properties"]
    );
    assert_eq!(payload["required"], expected.schema.as_value()["required"]);
    let headers = &message["headers"]["properties"];
    assert_eq!(headers[tidings::HEADER_EVENT_TYPE]["const"], "OrderCreated");
    assert_eq!(headers[tidings::HEADER_EVENT_VERSION]["const"], "2");
    assert!(headers[tidings::HEADER_EVENT_ID].is_object());
    assert!(headers[tidings::HEADER_AGGREGATE_TYPE].is_object());
    assert_eq!(message["bindings"]["kafka"]["key"]["type"], "string");
    assert_eq!(
        doc["operations"]["publish_orders"]["action"], "send",
        "the service publishes"
    );
}

#[test]
fn the_asyncapi_document_addresses_prefixed_topics_and_the_parser_rejects_a_broken_one() {
    let doc = document("staging.");
    let (valid, summary, output) = validate(&doc);
    assert!(valid, "{output}");
    assert_eq!(
        sorted(&summary["channels"]),
        ["staging.auctions", "staging.orders"]
    );

    // The check can fail: a dangling message reference is refused.
    let mut broken = doc.clone();
    broken["operations"]["publish_orders"]["messages"][0]["$ref"] =
        Value::String("#/channels/orders/messages/NoSuchEvent".into());
    let (valid, summary, output) = validate(&broken);
    assert!(!valid, "a broken document passed:\n{output}");
    assert!(summary["errors"].as_u64().unwrap() > 0, "{output}");
}

/// Two services' worth of events whose nested types share names but not
/// shapes, one event name on two topics, and a recursive payload.
mod clashing {
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    pub(crate) struct Money {
        pub(crate) amount: i64,
    }
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    pub(crate) struct Line {
        pub(crate) price: Money,
    }
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    pub(crate) struct Node {
        pub(crate) children: Vec<Node>,
    }
    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        Created { line: Line },
        Tree(Node),
    }

    pub(crate) mod other {
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub(crate) struct Money {
            pub(crate) amount: String,
        }
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub(crate) struct Line {
            pub(crate) price: Money,
        }
        #[derive(Debug, Clone, tidings::Event)]
        #[event(topic = "quotes")]
        pub(crate) enum QuoteEvent {
            Created { line: Line },
        }
    }
}

/// Follows a `#/components/...` reference within `doc`.
fn follow<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node["$ref"].as_str() {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling reference {reference}")),
        None => node,
    }
}

#[test]
fn nested_types_of_one_name_and_one_event_name_on_two_topics_keep_their_own_shapes() {
    let catalog = tidings::schema::Catalog::new()
        .with::<clashing::OrderEvent>()
        .with::<clashing::other::QuoteEvent>();
    let doc = catalog
        .asyncapi(&AsyncApiInfo::new("clashing", "1"))
        .unwrap();
    let (valid, _, output) = validate(&doc);
    assert!(valid, "{output}");

    // Each `Created` message reaches its own Money through its own Line.
    let amount_type = |message: &str| {
        let envelope = &doc["components"]["messages"][message]["payload"];
        let payload = follow(&doc, &envelope["properties"]["payload"]);
        let line = follow(&doc, &payload["properties"]["line"]);
        let money = follow(&doc, &line["properties"]["price"]);
        money["properties"]["amount"]["type"].clone()
    };
    assert_eq!(amount_type("orders.Created"), "integer");
    assert_eq!(amount_type("quotes.Created"), "string");

    // The recursive payload refers to itself inside the document.
    let text = serde_json::to_string(&doc).unwrap();
    assert!(!text.contains("\"$ref\":\"#\""), "{text}");
    assert!(
        !text.contains("#/$defs/"),
        "every reference points into the document's components: {text}"
    );
    let tree = follow(
        &doc,
        &doc["components"]["messages"]["Tree"]["payload"]["properties"]["payload"],
    );
    let child = follow(&doc, &tree["properties"]["children"]["items"]);
    assert!(child["properties"]["children"].is_object(), "{tree}");
}

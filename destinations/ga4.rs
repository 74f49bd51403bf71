//! `ga4`: Google Analytics 4 Measurement Protocol (`POST /mp/collect`).
//!
//! A request carries one `client_id` (`anonymousId`, else `userId`) and at most 25 events, so a
//! batch is split per user. Segment's e-commerce events become GA4's recommended events
//! (`Product Added` → `add_to_cart`, `Order Completed` → `purchase`, ...) with `items` built
//! from the products; other tracks keep their name made valid for GA4 (letters, digits and `_`,
//! starting with a letter, at most 40 characters; reserved names get a `custom_` prefix).
//! Params are flat: scalar properties only, at most 25, values cut to 100 characters. page →
//! `page_view`, screen → `screen_viewed` (GA4's `screen_view` is for app streams), group →
//! `join_group`. Identify has no GA4 event: its traits (and every event's `context.traits`) are
//! sent as `user_properties` of the user's request in the same batch; an identify with no
//! event beside it, and alias, are counted delivered without a request.
//!
//! The users' requests of a batch go out at once, so they all end within the destination's
//! timeout: a user whose request hangs is retried alone, and the others' deliveries stand.
//!
//! GA4 answers 2xx even to invalid data; 429 and 5xx are retried, other answers are permanent.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use url::Url;

use super::mapping::{self, Message};
use crate::destination::{
    classify_status, Built, Call, DeliveryContext, Destination, Event, HttpRequest, Kind,
    KindDefaults, Part, Plan, SettingError, Settings, Verdict,
};

pub static KIND: Kind = Kind {
    name: "ga4",
    catalog_name: "Google Analytics 4",
    defaults: KindDefaults {
        batch_size: 25,
        max_batch_size: 25,
        rate_limit: None,
    },
    build,
};

const DEFAULT_BASE: &str = "https://www.google-analytics.com";
/// Bodies must stay under 130 kB; room is left for the envelope and user properties.
const MAX_EVENT_BYTES: usize = 110_000;
const MAX_PARAMS: usize = 25;
const MAX_USER_PROPERTIES: usize = 25;

/// Segment e-commerce (and a few common) events and the GA4 recommended event for each.
const RECOMMENDED: [(&str, &str); 19] = [
    ("Products Searched", "search"),
    ("Product List Viewed", "view_item_list"),
    ("Promotion Viewed", "view_promotion"),
    ("Promotion Clicked", "select_promotion"),
    ("Product Clicked", "select_item"),
    ("Product Viewed", "view_item"),
    ("Product Added", "add_to_cart"),
    ("Product Removed", "remove_from_cart"),
    ("Cart Viewed", "view_cart"),
    ("Checkout Started", "begin_checkout"),
    ("Payment Info Entered", "add_payment_info"),
    ("Checkout Step Completed", "add_shipping_info"),
    ("Order Completed", "purchase"),
    ("Order Refunded", "refund"),
    ("Product Added to Wishlist", "add_to_wishlist"),
    ("Product Shared", "share"),
    ("Cart Shared", "share"),
    ("Signed In", "login"),
    ("Signed Up", "sign_up"),
];

/// Event names GA4 reserves (plus the prefixes in [`RESERVED_PREFIXES`]); `ad_impression`,
/// `in_app_purchase` and `screen_view` are for app streams only.
const RESERVED_EVENTS: &str = "ad_activeview ad_click ad_exposure ad_query ad_reward \
    adunit_exposure app_background app_clear_data app_exception app_install app_remove \
    app_store_refund app_update app_upgrade dynamic_link_app_open dynamic_link_app_update \
    dynamic_link_first_open error firebase_campaign first_open first_visit \
    notification_dismiss notification_foreground notification_open notification_receive \
    notification_send os_update session_start user_engagement ad_impression in_app_purchase \
    screen_view";
/// User property names GA4 reserves.
const RESERVED_USER_PROPERTIES: &str =
    "first_open_time first_visit_time last_deep_link_referrer user_id first_open_after_install";
/// Param names GA4 reserves.
const RESERVED_PARAMS: &str = "firebase_conversion";
const RESERVED_PREFIXES: [&str; 4] = ["firebase_", "ga_", "google_", "gtag"];

/// The keys a `ga4` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ga4Config {
    /// The web data stream's Measurement ID, `G-` and capitals or digits (Admin > Data
    /// streams > the stream). With the kind it is the default `rate_limit_key`.
    measurement_id: String,
    /// A Measurement Protocol API secret of that stream (Admin > Data streams > the stream >
    /// Measurement Protocol API secrets). For the EU endpoint set
    /// `endpoint = "https://region1.google-analytics.com"`.
    api_secret: String,
}

/// A configured GA4 destination.
pub struct Ga4 {
    url: Url,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<Ga4Config>(&mut errors) else {
        return Err(errors);
    };
    let id = &config.measurement_id;
    let valid = id.strip_prefix("G-").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    });
    if !valid {
        errors.push(SettingError::new(
            "measurement_id",
            format!("`{id}` is not a Measurement ID: expected `G-` then capitals and digits, such as `G-ABC123XYZ`"),
        ));
    }
    mapping::non_empty("api_secret", &config.api_secret, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut url = mapping::endpoint_url(settings.endpoint, DEFAULT_BASE, "/mp/collect");
    url.query_pairs_mut()
        .append_pair("measurement_id", id)
        .append_pair("api_secret", &config.api_secret);
    Ok(Built {
        credential: Some(config.measurement_id.clone()),
        plugin: Arc::new(Ga4 { url }),
    })
}

/// A name GA4 accepts: `[A-Za-z][A-Za-z0-9_]*`, at most `max` characters, not reserved.
/// `reserved` lists names separated by whitespace.
fn ga4_name(raw: &str, max: usize, reserved: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let name = cleaned.trim_start_matches(|c: char| !c.is_ascii_alphabetic());
    let name = if name.is_empty() { "event" } else { name };
    let lower = name.to_ascii_lowercase();
    let taken = reserved.split_whitespace().any(|r| r == lower)
        || RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p));
    let name = if taken {
        format!("custom_{name}")
    } else {
        name.to_owned()
    };
    mapping::truncate(&name, max).to_owned()
}

/// A scalar as a GA4 value (numbers stay numbers; text is cut to `max` characters).
fn scalar(value: &Value, max: usize) -> Option<Value> {
    match value {
        Value::Number(_) => Some(value.clone()),
        Value::String(text) => Some(mapping::truncate(text, max).into()),
        Value::Bool(flag) => Some(flag.to_string().into()),
        _ => None,
    }
}

/// One Segment message as a GA4 event; `None` when GA4 has no event for it.
fn event(message: &Message) -> Option<Value> {
    let mut params = Map::new();
    let name = match message.call()? {
        Call::Track => {
            let event = message.event().unwrap_or_default();
            match RECOMMENDED.iter().find(|(segment, _)| *segment == event) {
                Some((_, ga4)) => {
                    ecommerce(message, &mut params);
                    (*ga4).to_owned()
                }
                None => ga4_name(event, 40, RESERVED_EVENTS),
            }
        }
        Call::Page => {
            let url = message
                .str("properties.url")
                .or(message.str("context.page.url"));
            mapping::put(&mut params, "page_location", url);
            let title = message.str("properties.title").or(message.name());
            mapping::put(&mut params, "page_title", title);
            let referrer = message
                .str("properties.referrer")
                .or(message.str("context.page.referrer"));
            mapping::put(&mut params, "page_referrer", referrer);
            "page_view".to_owned()
        }
        Call::Screen => {
            mapping::put(&mut params, "screen_name", message.name());
            "screen_viewed".to_owned()
        }
        Call::Group => {
            mapping::put(&mut params, "group_id", message.str("groupId"));
            "join_group".to_owned()
        }
        Call::Identify | Call::Alias => return None,
    };
    for (key, value) in message.properties() {
        if params.len() >= MAX_PARAMS - 1 {
            break;
        }
        let key = ga4_name(&key, 40, RESERVED_PARAMS);
        if let (false, Some(value)) = (params.contains_key(&key), scalar(&value, 100)) {
            params.insert(key, value);
        }
    }
    params
        .entry("engagement_time_msec")
        .or_insert_with(|| json!(1));
    let mut event = Map::new();
    event.insert("name".into(), name.into());
    event.insert("params".into(), params.into());
    mapping::put(&mut event, "timestamp_micros", message.epoch_micros());
    Some(event.into())
}

/// Params of GA4's recommended e-commerce events from Segment's e-commerce spec.
fn ecommerce(message: &Message, params: &mut Map<String, Value>) {
    let text = |path: &str| {
        message
            .str(path)
            .map(|s| mapping::truncate(s, 100).to_owned())
    };
    let number = |path: &str| message.get(path).filter(|v| v.is_number()).cloned();
    mapping::put(params, "currency", text("properties.currency"));
    let value = ["properties.value", "properties.revenue", "properties.total"]
        .iter()
        .find_map(|path| number(path));
    mapping::put(params, "value", value);
    mapping::put(params, "transaction_id", text("properties.order_id"));
    mapping::put(params, "coupon", text("properties.coupon"));
    mapping::put(params, "shipping", number("properties.shipping"));
    mapping::put(params, "tax", number("properties.tax"));
    mapping::put(params, "affiliation", text("properties.affiliation"));
    mapping::put(params, "search_term", text("properties.query"));
    mapping::put(params, "item_list_id", text("properties.list_id"));
    mapping::put(params, "promotion_id", text("properties.promotion_id"));
    mapping::put(params, "creative_name", text("properties.creative"));
    mapping::put(params, "method", text("properties.method"));
    const ITEM_FIELDS: [(&str, &str); 9] = [
        ("name", "item_name"),
        ("brand", "item_brand"),
        ("category", "item_category"),
        ("variant", "item_variant"),
        ("price", "price"),
        ("quantity", "quantity"),
        ("coupon", "coupon"),
        ("position", "index"),
        ("url", "item_url"),
    ];
    let items: Vec<Value> = message
        .products()
        .iter()
        .take(200)
        .map(|product| {
            let mut item = Map::new();
            let id = product.get("product_id").or_else(|| product.get("sku"));
            mapping::put(&mut item, "item_id", id.and_then(|v| scalar(v, 100)));
            for (segment, ga4) in ITEM_FIELDS {
                mapping::put(
                    &mut item,
                    ga4,
                    product.get(segment).and_then(|v| scalar(v, 100)),
                );
            }
            Value::Object(item)
        })
        .collect();
    if !items.is_empty() {
        params.insert("items".into(), items.into());
    }
}

/// Traits as GA4 user properties (`{name: {value}}`): names of at most 24 characters, values
/// of at most 36, at most 25 of them.
fn user_properties(traits: &Map<String, Value>, into: &mut Map<String, Value>) {
    for (key, value) in traits {
        let name = ga4_name(key, 24, RESERVED_USER_PROPERTIES);
        match scalar(value, 36) {
            Some(value) if into.len() < MAX_USER_PROPERTIES || into.contains_key(&name) => {
                into.insert(name, json!({ "value": value }));
            }
            _ => {}
        }
    }
}

/// The events of one user in a batch: what goes in their requests.
struct User {
    client_id: String,
    user_id: Option<String>,
    /// Indexes of events with a GA4 event, and the event serialized.
    events: Vec<(usize, Vec<u8>)>,
    /// Indexes of identify calls, which ride along with the user's first request.
    identifies: Vec<usize>,
    user_properties: Map<String, Value>,
}

impl Ga4 {
    fn plan(&self, events: &[Event]) -> Plan {
        let mut plan = Plan::new(events.len());
        let mut users: Vec<User> = Vec::new();
        for (index, source) in events.iter().enumerate() {
            let message = Message::of(source);
            let Some(client_id) = message.anonymous_id().or(message.user_id()) else {
                plan.fail(
                    index,
                    "GA4 needs a client_id: the message has no anonymousId or userId",
                );
                continue;
            };
            if message.call() == Some(Call::Alias) {
                plan.skip(index);
                continue;
            }
            let user_id = message.user_id().map(str::to_owned);
            let position = users
                .iter()
                .position(|u| u.client_id == client_id && u.user_id == user_id);
            let user = match position {
                Some(position) => &mut users[position],
                None => {
                    users.push(User {
                        client_id: client_id.to_owned(),
                        user_id,
                        events: Vec::new(),
                        identifies: Vec::new(),
                        user_properties: Map::new(),
                    });
                    let last = users.len() - 1;
                    &mut users[last]
                }
            };
            user_properties(&message.traits(), &mut user.user_properties);
            match event(&message) {
                Some(event) => user.events.push((index, event.to_string().into_bytes())),
                None => user.identifies.push(index),
            }
        }
        for user in users {
            if user.events.is_empty() {
                // GA4 stores user properties only with an event.
                user.identifies.iter().for_each(|&index| plan.skip(index));
                continue;
            }
            let sizes: Vec<usize> = user.events.iter().map(|(_, b)| b.len()).collect();
            let runs = mapping::pack(&sizes, KIND.defaults.max_batch_size, MAX_EVENT_BYTES);
            for (n, run) in runs.into_iter().enumerate() {
                let items = &user.events[run];
                let mut indexes: Vec<usize> = items.iter().map(|(index, _)| *index).collect();
                if n == 0 {
                    indexes.extend(&user.identifies);
                }
                let mut envelope = Map::new();
                envelope.insert("client_id".into(), user.client_id.as_str().into());
                mapping::put(&mut envelope, "user_id", user.user_id.as_deref());
                if !user.user_properties.is_empty() {
                    envelope.insert(
                        "user_properties".into(),
                        user.user_properties.clone().into(),
                    );
                }
                let mut body = Value::Object(envelope).to_string().into_bytes();
                body.pop();
                body.extend_from_slice(br#","events":"#);
                body.extend(mapping::json_array(items.iter().map(|(_, b)| &b[..])));
                body.push(b'}');
                plan.send(Part {
                    label: "collect",
                    events: indexes,
                    request: HttpRequest::post_json(self.url.clone(), body),
                });
            }
        }
        plan
    }
}

impl Destination for Ga4 {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(
            self.plan(events)
                .deliver_concurrently(ctx, |_, answer, _| Verdict::All(classify_status(answer))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_ga4_rules() {
        assert_eq!(
            ga4_name("Video Played", 40, RESERVED_EVENTS),
            "Video_Played"
        );
        assert_eq!(ga4_name("3D view!", 40, RESERVED_EVENTS), "D_view_");
        assert_eq!(
            ga4_name("session_start", 40, RESERVED_EVENTS),
            "custom_session_start"
        );
        assert_eq!(
            ga4_name("google_thing", 40, RESERVED_EVENTS),
            "custom_google_thing"
        );
        assert_eq!(ga4_name("€€", 40, RESERVED_EVENTS), "event");
        assert_eq!(ga4_name(&"a".repeat(50), 40, RESERVED_EVENTS).len(), 40);
    }

    #[test]
    fn order_completed_is_a_purchase_with_items() {
        let message = Message {
            json: json!({"type": "track", "event": "Order Completed", "anonymousId": "a",
                "timestamp": "2024-03-01T12:00:00.000Z",
                "properties": {"order_id": "T1", "revenue": 25.0, "currency": "USD",
                    "products": [{"product_id": "p1", "name": "Shirt", "price": 25.0, "quantity": 1}],
                    "nested": {"dropped": true}}}),
        };
        let event = event(&message).unwrap();
        assert_eq!(event["name"], "purchase");
        let params = &event["params"];
        assert_eq!(params["transaction_id"], "T1");
        assert_eq!(params["value"], 25.0);
        assert_eq!(params["items"][0]["item_id"], "p1");
        assert_eq!(params["items"][0]["item_name"], "Shirt");
        assert!(params.get("nested").is_none(), "params are flat");
        assert_eq!(event["timestamp_micros"], 1_709_294_400_000_000i64);
    }
}

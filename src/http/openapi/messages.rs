//! The Segment messages' schemas.
//!
//! Built by hand rather than derived: what ingest accepts ("a userId or an anonymousId", ids that
//! are non-empty strings or numbers, "at least one valid message in a batch") needs `anyOf` and
//! `contains`, which derived schemas cannot say.

use super::*;

/// A schema that is a reference to a component.
fn reference(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

fn typed(types: &[Type]) -> ObjectBuilder {
    match types {
        [one] => ObjectBuilder::new().schema_type(one.clone()),
        many => ObjectBuilder::new().schema_type(SchemaType::Array(many.to_vec())),
    }
}

/// An identifier that counts as present: a non-empty string, or a number (kept as its text).
fn present_id(description: &str) -> Schema {
    AnyOfBuilder::new()
        .item(typed(&[Type::String]).min_length(Some(1)))
        .item(typed(&[Type::Number]))
        .description(Some(description))
        .into()
}

/// An identifier that may be absent: null and "" count as absent.
fn optional_id(description: &str) -> ObjectBuilder {
    typed(&[Type::String, Type::Number, Type::Null]).description(Some(description))
}

fn optional_object(description: &str) -> ObjectBuilder {
    typed(&[Type::Object, Type::Null]).description(Some(description))
}

fn optional_string(description: &str) -> ObjectBuilder {
    typed(&[Type::String, Type::Null]).description(Some(description))
}

/// What ingest parses as a time: RFC 3339 (`T`, `t` or a space between date and time), or a
/// date-time without an offset (read as UTC). Days that do not exist are left out (February
/// 29th too, though ingest takes it in leap years). Digits are spelled `[0-9]`, since some regex
/// engines take `\d` to mean any Unicode digit.
const TIME_PATTERN: &str = concat!(
    "^[0-9]{4}-(",
    "(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])",
    "|(0[469]|11)-(0[1-9]|[12][0-9]|30)",
    "|02-(0[1-9]|1[0-9]|2[0-8]))",
    // `T`, then an optional offset (none: UTC)
    "(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?",
    "([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?",
    // `t` or a space, then an offset
    "|[t ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?",
    "([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))$",
);

fn optional_time(description: &str) -> ObjectBuilder {
    // No `format: date-time`: that format needs an offset, and ingest also takes times without.
    optional_string(description).pattern(Some(TIME_PATTERN))
}

/// `{"type": "object", "required": [field], "properties": {field: schema}}`.
fn requires(field: &str, schema: impl Into<RefOr<Schema>>) -> Schema {
    typed(&[Type::Object])
        .property(field, schema)
        .required(field)
        .into()
}

/// Declares a schema type whose schema the named function builds.
macro_rules! schema {
    ($(#[$doc:meta])* $name:ident = $build:ident) => {
        $(#[$doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $build().into()
            }
        }

        impl ToSchema for $name {}
    };
}

schema!(
    /// A message names its user: `userId`, `anonymousId`, or both.
    Identity = identity
);
schema!(
    /// The fields every call may carry; anything else is kept and passed on as it is.
    CommonFields = common_fields
);
schema!(
    /// `track`: an action a user took.
    TrackMessage = track_message
);
schema!(
    /// `identify`: who a user is.
    IdentifyMessage = identify_message
);
schema!(
    /// `page`: a page view.
    PageMessage = page_message
);
schema!(
    /// `screen`: a screen view.
    ScreenMessage = screen_message
);
schema!(
    /// `group`: a user joins a group.
    GroupMessage = group_message
);
schema!(
    /// `alias`: two ids are one user.
    AliasMessage = alias_message
);
schema!(
    /// One message of a batch: any call, named by `type`.
    BatchMessage = batch_message
);
schema!(
    /// The body of `/v1/batch` and `/v1/import`.
    BatchRequest = batch_request
);

fn identity() -> Schema {
    AnyOfBuilder::new()
        .item(requires(
            "userId",
            present_id("The user's id in your database"),
        ))
        .item(requires(
            "anonymousId",
            present_id("An id for a user not yet known"),
        ))
        .description(Some(
            "A message needs a `userId` or an `anonymousId` (a null or empty one is fine when \
             the other is set)",
        ))
        .into()
}

fn common_fields() -> Schema {
    const WRITE_KEY: &str = "The source's write key, when not sent as HTTP Basic";
    typed(&[Type::Object])
        .property("userId", optional_id("The user's id in your database"))
        .property("anonymousId", optional_id("An id for a user not yet known"))
        .property(
            "messageId",
            optional_id(
                "Unique per message: a repeat within 24 h is not delivered again. Set by the \
                 server when missing.",
            )
            .max_length(Some(512)),
        )
        .property(
            "timestamp",
            optional_time("When it happened, by the client's clock (corrected with sentAt)"),
        )
        .property("sentAt", optional_time("When the client sent it"))
        .property(
            "context",
            optional_object("Extra information about the user and device"),
        )
        .property(
            "integrations",
            optional_object("Which destinations get it: {\"All\": false, \"Name\": true}"),
        )
        .property(
            "properties",
            optional_object("Properties of the event or page"),
        )
        .property("traits", optional_object("Traits of the user or group"))
        .property("name", optional_string("Page or screen name"))
        .property("category", optional_string("Page category"))
        .property("writeKey", optional_string(WRITE_KEY))
        .into()
}

/// A message of one call: who, the common fields, and the call's own required fields.
fn message(own: Option<Schema>, description: &str) -> Schema {
    let mut all = AllOfBuilder::new()
        .item(reference("Identity"))
        .item(reference("CommonFields"));
    if let Some(own) = own {
        all = all.item(own);
    }
    all.description(Some(description)).into()
}

fn track_fields() -> Schema {
    requires(
        "event",
        typed(&[Type::String])
            .min_length(Some(1))
            .description(Some("The action, e.g. `Order Completed`")),
    )
}

fn group_fields() -> Schema {
    requires("groupId", present_id("The group's id"))
}

fn alias_fields() -> Schema {
    requires("previousId", present_id("The user's earlier id"))
}

fn track_message() -> Schema {
    message(Some(track_fields()), "A track call")
}

fn identify_message() -> Schema {
    message(None, "An identify call")
}

fn page_message() -> Schema {
    message(None, "A page call")
}

fn screen_message() -> Schema {
    message(None, "A screen call")
}

fn group_message() -> Schema {
    message(Some(group_fields()), "A group call")
}

fn alias_message() -> Schema {
    message(Some(alias_fields()), "An alias call")
}

/// A batch item of one call type: the call's message with `type` naming it.
fn batch_item(call: &str, own: Option<Schema>) -> Schema {
    let mut all = AllOfBuilder::new()
        .item(reference("Identity"))
        .item(reference("CommonFields"))
        .item(requires(
            "type",
            typed(&[Type::String]).enum_values(Some([call])),
        ));
    if let Some(own) = own {
        all = all.item(own);
    }
    all.into()
}

fn batch_message() -> Schema {
    OneOfBuilder::new()
        .item(batch_item("track", Some(track_fields())))
        .item(batch_item("identify", None))
        .item(batch_item("page", None))
        .item(batch_item("screen", None))
        .item(batch_item("group", Some(group_fields())))
        .item(batch_item("alias", Some(alias_fields())))
        .description(Some("A message of any call type"))
        .into()
}

/// The `batch` array: empty, or holding at least one valid message. Invalid items do not fail
/// the request (they are listed in `rejected`), so items are not constrained one by one.
/// utoipa's schema model has no `contains`, so that keyword goes in through its extension map
/// (which serializes its keys as they are).
fn batch_array() -> Schema {
    let contains: Extensions = [(
        "contains",
        serde_json::json!({"$ref": "#/components/schemas/BatchMessage"}),
    )]
    .into_iter()
    .collect();
    let any_items = || RefOr::T(Schema::Object(Object::with_type(SchemaType::AnyValue)));
    AnyOfBuilder::new()
        .item(ArrayBuilder::new().items(any_items()).max_items(Some(0)))
        .item(
            ArrayBuilder::new()
                .items(any_items())
                .max_items(Some(crate::ingest::MAX_BATCH_MESSAGES))
                .extensions(Some(contains)),
        )
        .description(Some(
            "At most 2,500 messages; at least one of them valid unless empty",
        ))
        .into()
}

fn batch_request() -> Schema {
    const WRITE_KEY: &str = "The source's write key, when not sent as HTTP Basic";
    typed(&[Type::Object])
        .property("batch", batch_array())
        .required("batch")
        .property("writeKey", optional_string(WRITE_KEY))
        .property(
            "sentAt",
            optional_time("When the client sent the batch (for messages without their own)"),
        )
        .property(
            "context",
            optional_object("Defaults for every message's `context`"),
        )
        .property(
            "integrations",
            optional_object("Defaults for every message's `integrations`"),
        )
        .into()
}

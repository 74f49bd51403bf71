//! `consent`: the categories a destination needs, against the event's
//! `context.consent.categoryPreferences` (Segment's consent object, as its Consent Management
//! and the consent wrappers of analytics.js set it).

use serde_json::Value;

/// Whether an event may go to a destination that needs `categories`. Events without consent
/// data (no object, or an empty one) may; otherwise every category must be set to `true`: one
/// set to `false`, or left out while others are given, denies it.
pub fn allows(categories: &[String], event: &Value) -> bool {
    if categories.is_empty() {
        return true;
    }
    let preferences = event
        .pointer("/context/consent/categoryPreferences")
        .and_then(Value::as_object);
    match preferences {
        None => true,
        Some(preferences) if preferences.is_empty() => true,
        Some(preferences) => categories
            .iter()
            .all(|category| preferences.get(category) == Some(&Value::Bool(true))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn needs(categories: &[&str]) -> Vec<String> {
        categories.iter().map(|c| (*c).to_owned()).collect()
    }

    fn with(preferences: Value) -> Value {
        json!({"context": {"consent": {"categoryPreferences": preferences}}})
    }

    #[test]
    fn categories_against_preferences() {
        let ads = needs(&["Advertising"]);
        let both = needs(&["Advertising", "Analytics"]);
        assert!(allows(&ads, &with(json!({"Advertising": true}))));
        assert!(!allows(&ads, &with(json!({"Advertising": false}))));
        assert!(
            !allows(&ads, &with(json!({"Analytics": true}))),
            "left out while others are given"
        );
        assert!(allows(
            &both,
            &with(json!({"Advertising": true, "Analytics": true}))
        ));
        assert!(!allows(
            &both,
            &with(json!({"Advertising": true, "Analytics": false}))
        ));
        assert!(
            !allows(&ads, &with(json!({"Advertising": "yes"}))),
            "only true consents"
        );
    }

    #[test]
    fn events_without_consent_data_are_allowed() {
        let ads = needs(&["Advertising"]);
        assert!(allows(&ads, &json!({"event": "x"})));
        assert!(allows(&ads, &json!({"context": {}})));
        assert!(allows(&ads, &json!({"context": {"consent": {}}})));
        assert!(allows(&ads, &with(json!({}))));
        assert!(allows(&ads, &with(json!(null))));
        assert!(allows(&[], &with(json!({"Advertising": false}))));
    }
}

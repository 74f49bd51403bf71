//! URLs shown without the secrets they may carry. Vendors put credentials in the user info
//! (`https://user:pass@…`), in the query (`?token=…`) and in the path (Slack's
//! `/services/T…/B…/secret`), so what is shown of a URL is its scheme, host and port only:
//! config errors (logged, and answered by the reload API) and metric labels go through here.

/// `raw`, valid URL or not, as `scheme://host:port` followed by `/***` when it had a path
/// beyond `/`, a query or a fragment; user info becomes `***@`.
pub fn url(raw: &str) -> String {
    let (scheme, rest) = match raw.find("://") {
        Some(at) => (&raw[..at + 3], &raw[at + 3..]),
        None => ("", raw),
    };
    let authority_end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let hidden = if tail.is_empty() || tail == "/" {
        tail
    } else {
        "/***"
    };
    format!("{scheme}{host}{hidden}")
}

/// `text` with every URL in it (anything that looks like `scheme://…`) shown as [`url`] shows
/// it; for messages that quote what they were given.
pub fn urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '<' | '>'))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&url(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_queries_and_paths_are_hidden() {
        assert_eq!(
            url("https://user:pass@hooks.example:8443/services/T0/B0/secret?token=abc#x"),
            "https://***@hooks.example:8443/***"
        );
        assert_eq!(url("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(url("http://127.0.0.1:9000/"), "http://127.0.0.1:9000/");
        assert_eq!(url("http://h/?key=1"), "http://h/***");
        assert_eq!(url("ftp://[::1]:21/x"), "ftp://[::1]:21/***");
        assert_eq!(url("not a url/secret"), "not a url/***");
        assert_eq!(url("http://a@b@c/x"), "http://***@c/***");
    }

    #[test]
    fn every_url_in_a_message_is_hidden() {
        assert_eq!(
            urls_in("`https://u:p@h.example/t0k3n?k=s3cret` is not valid: x"),
            "`https://***@h.example/***` is not valid: x"
        );
        assert_eq!(
            urls_in("a postgres://me:pw@db/x and http://h/p"),
            "a postgres://***@db/*** and http://h/***"
        );
        assert_eq!(urls_in("no url here"), "no url here");
        assert_eq!(urls_in("://odd"), "://odd");
    }
}

//! [`redact_url`]: a URL fit for logs and error messages.

/// Query parameters whose values are secrets.
const SECRET_PARAMS: &[&str] = &["pass", "password", "secret", "token", "key"];

/// `url` with its user information (`user:password@`) replaced by `***@`
/// and the values of secret-looking query parameters (`pass`, `password`,
/// `secret`, `token`, `key`) by `***`, for logs and error messages. The rest
/// (scheme, host, port, path, other parameters) is kept, so the message still
/// says where the connection went.
///
/// ```
/// use proclaim_core::redact_url;
///
/// assert_eq!(redact_url("amqp://relay:s3cret@127.0.0.1:5672/%2f"), "amqp://***@127.0.0.1:5672/%2f");
/// assert_eq!(redact_url("redis://127.0.0.1/0?pass=s3cret&db=2"), "redis://127.0.0.1/0?pass=***&db=2");
/// assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    let tail = match before_fragment.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _))
                        if SECRET_PARAMS.iter().any(|s| name.eq_ignore_ascii_case(s)) =>
                    {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}{fragment}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn hides_user_information_and_secret_parameters_only() {
        for (url, shown) in [
            ("nats://token@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
            ("mqtt://u:p@h:1883", "mqtt://***@h:1883"),
            ("https://h/x?a=1&Token=t#f", "https://h/x?a=1&Token=***#f"),
            ("https://h/a@b", "https://h/a@b"),
            ("postgres://h/db", "postgres://h/db"),
            ("not a url", "not a url"),
            ("kafka://h1:9092,h2:9092", "kafka://h1:9092,h2:9092"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}

//! The broker URL: `mqtt://[user[:password]@]host[:port]`.

/// Default MQTT port.
pub(crate) const DEFAULT_PORT: u16 = 1883;

/// A parsed broker URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Parses `url`; the error is a reason that never contains the password.
pub(crate) fn parse(url: &str) -> Result<BrokerUrl, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("has no scheme (expected mqtt://host:port)".into());
    };
    match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => {}
        "mqtts" | "ssl" | "tls" | "ws" | "wss" => {
            return Err(format!(
                "uses {scheme}://, which this publisher does not support (plain TCP only: mqtt://)"
            ));
        }
        _ => {
            return Err(format!(
                "has the unknown scheme {scheme:?} (expected mqtt://)"
            ));
        }
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("has a path, query or fragment (expected mqtt://host:port)".into());
    }
    let (userinfo, hostport) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            let user = percent_decode(user).ok_or("has an invalid %-escape in the user name")?;
            let pass = pass
                .map(percent_decode)
                .map(|p| p.ok_or("has an invalid %-escape in the password"))
                .transpose()?;
            (Some(user), pass)
        }
    };
    let (host, port) = split_host_port(hostport)?;
    if host.is_empty() {
        return Err("names no host".into());
    }
    Ok(BrokerUrl {
        host,
        port,
        username,
        password,
    })
}

fn split_host_port(hostport: &str) -> Result<(String, u16), String> {
    // IPv6 literal: [::1]:1883
    if let Some(rest) = hostport.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err("has an unclosed '[' in the host".into());
        };
        let port = match after {
            "" => DEFAULT_PORT,
            _ => match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None => return Err("has text after the IPv6 host".into()),
            },
        };
        return Ok((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_owned(), parse_port(port)?)),
        None => Ok((hostport.to_owned(), DEFAULT_PORT)),
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("has an invalid port {port:?}")),
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_credentials() {
        let plain = parse("mqtt://127.0.0.1:1884").ok();
        assert_eq!(
            plain,
            Some(BrokerUrl {
                host: "127.0.0.1".into(),
                port: 1884,
                username: None,
                password: None
            })
        );
        let default_port = parse("tcp://broker.internal/").ok();
        assert_eq!(
            default_port.map(|u| (u.host, u.port)),
            Some(("broker.internal".into(), 1883))
        );
        let v6 = parse("mqtt://[::1]:2000").ok();
        assert_eq!(v6.map(|u| (u.host, u.port)), Some(("::1".into(), 2000)));
        let creds = parse("mqtt://relay:p%40ss:w@host").ok();
        assert_eq!(
            creds.map(|u| (u.username, u.password)),
            Some((Some("relay".into()), Some("p@ss:w".into())))
        );
        let user_only = parse("mqtt://relay@host").ok();
        assert_eq!(
            user_only.map(|u| (u.username, u.password)),
            Some((Some("relay".into()), None))
        );
    }

    #[test]
    fn rejects_what_it_cannot_connect_to() {
        for bad in [
            "",
            "127.0.0.1:1883",
            "http://host",
            "mqtts://host",
            "ws://host",
            "mqtt://",
            "mqtt://host:0",
            "mqtt://host:99999",
            "mqtt://host:x",
            "mqtt://host/path",
            "mqtt://host?x=1",
            "mqtt://[::1",
            "mqtt://u:%zz@host",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_hide_the_password() {
        let err = parse("mqtt://u:s3cret@h:bad").err().unwrap_or_default();
        assert!(!err.contains("s3cret"), "{err}");
    }
}

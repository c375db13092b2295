//! Configuration tests: the documented file equals the defaults, the grammar, errors that name
//! their key, layering, and the shipped profiles.

use super::*;

#[test]
fn default_toml_documents_exactly_the_defaults() {
    let from_file: Config = toml::from_str(DEFAULT_TOML).expect("configs/default.toml parses");
    assert_eq!(from_file, Config::default());
    // Every key of the defaults appears in the file (no undocumented key).
    let defaults: toml::Value = toml::Value::try_from(Config::default()).unwrap();
    let file: toml::Value = toml::from_str(DEFAULT_TOML).unwrap();
    assert_eq!(keys(&defaults, ""), keys(&file, ""));
}

fn keys(v: &toml::Value, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                out.extend(keys(v, &path));
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn shipped_profiles_parse_and_validate() {
    for (name, text) in BUILTIN_PROFILES {
        let cfg = from_toml_str(text).unwrap_or_else(|e| panic!("profile {name}: {e}"));
        assert!(cfg.validate().is_ok(), "profile {name}");
        let on_disk = std::fs::read_to_string(format!(
            "{}/../configs/profiles/{name}.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert_eq!(&on_disk, text);
    }
    let bm = from_toml_str(BUILTIN_PROFILES[1].1).unwrap();
    assert_eq!(bm.shard_cpus().len(), 15);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let e = from_toml_str("[mqtt]\nmax_inflihgt = 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_inflihgt"), "{e}");
    let e = from_toml_str("[nope]\nx = 1\n").unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("[mqtt]\nmax_inflight = \"many\"\n", "mqtt.max_inflight"),
        (
            "[mqtt]\nretry_interval = \"3 fortnights\"\n",
            "mqtt.retry_interval",
        ),
        (
            "[mqtt]\nmax_packet_size = \"1TB\"\n",
            "mqtt.max_packet_size",
        ),
        ("[mqtt]\nmax_inflight = 0\n", "mqtt.max_inflight"),
        (
            "[mqtt]\nkeepalive_multiplier = 0.5\n",
            "mqtt.keepalive_multiplier",
        ),
        (
            "[listener.tcp.external]\nbind = \"not an address\"\n",
            "listener.tcp.external.bind",
        ),
        ("[shards]\ncpus = [0, 0]\n", "shards.cpus"),
        ("[shards]\ncpus = \"some\"\n", "shards.cpus"),
        ("[shards]\ncpus = [0]\nmqtt = [1]\n", "shards.mqtt"),
        ("[log]\nlevel = \"loud=[\"\n", "log.level"),
        (
            "[listener.ssl.external]\nversions = [\"tlsv1.1\"]\n",
            "listener.ssl.external.versions",
        ),
        (
            "[listener.ssl.external]\ncertfile = \"/a.crt\"\n",
            "listener.ssl.external.keyfile",
        ),
        (
            "[listener.wss.external]\nverify = \"verify_peer\"\n",
            "listener.wss.external.cacertfile",
        ),
        (
            "[listener.ssl.external]\nverify = \"sometimes\"\n",
            "listener.ssl.external.verify",
        ),
        (
            "[listener.ssl.external]\npeer_cert_as_username = \"cn\"\n",
            "listener.ssl.external.peer_cert_as_username",
        ),
        (
            "[listener.wss.external]\npath = \"mqtt\"\n",
            "listener.wss.external.path",
        ),
        (
            "[mqtt.sn.predefined]\n0 = \"reserved\"\n",
            "mqtt.sn.predefined.0",
        ),
        (
            "[mqtt.sn.predefined]\nseven = \"a/b\"\n",
            "mqtt.sn.predefined.seven",
        ),
        (
            "[mqtt.sn.predefined]\n3 = \"a/+\"\n",
            "mqtt.sn.predefined.3",
        ),
        (
            "[mqtt.sn.predefined]\n3 = \"a\"\n4 = \"a\"\n",
            "mqtt.sn.predefined.4",
        ),
        (
            "[mqtt.sn]\nadvertise_address = \"everyone\"\n",
            "mqtt.sn.advertise_address",
        ),
        (
            "[mqtt.sn]\nadvertise_address = \"127.0.0.1:1884\"\nadvertise_duration = \"2d\"\n",
            "mqtt.sn.advertise_duration",
        ),
        ("[mqtt.sn]\nmax_clients = 0\n", "mqtt.sn.max_clients"),
        (
            "[mqtt.sn]\nretry_interval = \"0s\"\n",
            "mqtt.sn.retry_interval",
        ),
        ("[mqtt.sn]\nbind = \"0.0.0.0:1884\"\n", "mqtt.sn.bind"),
        ("[lwm2m]\ncertfile = \"/a.crt\"\n", "lwm2m.keyfile"),
        (
            "[lwm2m]\npsk_file = \"/p\"\ndtls_port = 5683\n",
            "lwm2m.dtls_port",
        ),
        ("[lwm2m]\nlifetime_min = \"0s\"\n", "lwm2m.lifetime_min"),
        (
            "[lwm2m]\nupdate_msg_publish_condition = \"never\"\n",
            "lwm2m.update_msg_publish_condition",
        ),
        (
            "[lwm2m.topics]\nresponse = \"lwm2m/+/r\"\n",
            "lwm2m.topics.response",
        ),
        ("[lwm2m]\nmax_retransmit = 50\n", "lwm2m.max_retransmit"),
    ];
    for (text, key) in cases {
        let e = from_toml_str(text).expect_err(text).to_string();
        assert!(e.contains(key), "{text:?} gave {e:?}");
    }
}

#[test]
fn values_use_the_grammar() {
    let c = from_toml_str(
        "[mqtt]\nretry_interval = \"0s\"\nawait_rel_timeout = 20\nmax_packet_size = \"64KB\"\n\
         [shards]\ncpus = [0]\n",
    )
    .unwrap();
    assert_eq!(c.mqtt.retry_interval.enabled(), None);
    assert_eq!(c.mqtt.await_rel_timeout, Duration::secs(20));
    assert_eq!(c.mqtt.max_packet_size, ByteSize(65536));
    assert_eq!(c.shard_cpus(), vec![0]);
    assert_eq!(c.mqtt_shards(), vec![0]);
}

#[test]
fn a_new_listener_gets_defaults_for_missing_keys() {
    let c = from_toml_str("[listener.tcp.internal]\nbind = \"127.0.0.1:11883\"\n").unwrap();
    assert_eq!(c.listener.tcp.len(), 2);
    let l = &c.listener.tcp["internal"];
    assert!(l.enable && l.nodelay);
    assert_eq!(l.backlog, 1024);
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
fn layering_file_profile_env() {
    let dir = std::env::temp_dir().join(format!("shardmq-cfg-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "[mqtt]\nmax_inflight = 10\nmax_mqueue_len = 20\n").unwrap();
    std::fs::write(dir.join("profiles/p.toml"), "[mqtt]\nmax_mqueue_len = 30\n").unwrap();
    figment::Jail::expect_with(|jail| {
        jail.set_env("SHARDMQ_LISTENER__TCP__EXTERNAL__BIND", "127.0.0.1:11883");
        jail.set_env("SHARDMQ_MQTT__RETRY_INTERVAL", "5s");
        let c = load(&LoadOptions {
            config_file: Some(file.clone()),
            profile: Some("p".into()),
            profiles_dir: Some(dir.join("profiles")),
            use_env: true,
        })
        .map_err(|e| e.to_string())?
        .config;
        assert_eq!(c.mqtt.max_inflight, 10);
        assert_eq!(c.mqtt.max_mqueue_len, 30);
        assert_eq!(c.mqtt.retry_interval, Duration::secs(5));
        assert_eq!(
            c.listener.tcp["external"].bind,
            "127.0.0.1:11883".parse().unwrap()
        );
        jail.set_env("SHARDMQ_MQTT__NO_SUCH_KEY", "1");
        let e = load(&LoadOptions {
            use_env: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no_such_key"), "{e}");
        Ok(())
    });
    let e = load(&LoadOptions {
        profile: Some("nope".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, ConfigError::UnknownProfile(..)));
    let e = load(&LoadOptions {
        config_file: Some(dir.join("missing.toml")),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, ConfigError::File(..)));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn print_config_round_trips() {
    let c = Config::default();
    let back = from_toml_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn the_admin_api_needs_credentials_off_loopback_and_good_ones() {
    let with = |toml: &str| from_toml_str(toml).and_then(|c| c.validate().map(|_| c));
    assert!(with("[admin]\nbind = \"127.0.0.1:18083\"\n").is_ok());
    assert!(with("[admin]\nbind = \"[::1]:18083\"\n").is_ok());
    let e = with("[admin]\nbind = \"0.0.0.0:18083\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("admin.bind") && e.contains("no default password"),
        "{e}"
    );
    // Off: no credentials needed wherever it would bind.
    assert!(with("[admin]\nenable = false\nbind = \"0.0.0.0:18083\"\n").is_ok());
    let ok =
        with("[admin]\nbind = \"0.0.0.0:18083\"\nusername = \"ops\"\npassword = \"12345678\"\n")
            .unwrap();
    assert!(ok.admin.needs_credentials());
    assert!(with("[admin]\nbind = \"0.0.0.0:1\"\napi_key = \"0123456789abcdef\"\n").is_ok());
    for (toml, key) in [
        ("[admin]\nusername = \"ops\"\n", "admin.password"),
        ("[admin]\npassword = \"12345678\"\n", "admin.username"),
        (
            "[admin]\nusername = \"o:ps\"\npassword = \"12345678\"\n",
            "admin.username",
        ),
        (
            "[admin]\nusername = \"ops\"\npassword = \"short\"\n",
            "admin.password",
        ),
        ("[admin]\napi_key = \"short\"\n", "admin.api_key"),
        (
            "[admin]\nrequest_timeout = \"0s\"\n",
            "admin.request_timeout",
        ),
    ] {
        let e = with(toml).unwrap_err().to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
    // Loopback with credentials set: they are required there too.
    let c = with("[admin]\napi_key = \"0123456789abcdef\"\n").unwrap();
    assert!(c.admin.needs_credentials());
    assert!(!Config::default().admin.needs_credentials());
}

#[test]
fn mqttsn_predefined_topics_and_addresses() {
    let c = from_toml_str(
        "[mqtt.sn]\nport = 2442\nbind = \"127.0.0.1\"\nadvertise_address = \"127.0.0.1:2000\"\n\
         [mqtt.sn.predefined]\n1 = \"a/b\"\n65534 = \"c\"\n",
    )
    .unwrap();
    assert_eq!(c.mqtt.sn.bind_addr(), "127.0.0.1:2442".parse().unwrap());
    assert_eq!(
        c.mqtt.sn.advertise_to(),
        Some("127.0.0.1:2000".parse().unwrap())
    );
    assert_eq!(
        c.mqtt.sn.predefined_topics().unwrap(),
        vec![(1, "a/b".to_string()), (65534, "c".to_string())]
    );
    assert_eq!(
        Config::default().mqtt.sn.advertise_to(),
        None,
        "off by default"
    );
}

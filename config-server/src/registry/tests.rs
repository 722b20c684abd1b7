use super::*;
use crate::ownership::{Caller, Denied};

/// The caller of every call here: ownership has tests of its own below.
static ANY: Caller = Caller::Anyone;

/// A unary registration by [`ANY`].
fn unary() -> Registrant<'static> {
    Registrant {
        caller: &ANY,
        session: None,
    }
}

const TTL: Duration = Duration::from_secs(3);

fn registry() -> Registry {
    registry_with(Vec::new(), Limits::default())
}

fn registry_with(static_entries: Vec<(String, String)>, limits: Limits) -> Registry {
    Registry::new(RegistryConfig {
        ttl: TTL,
        static_entries,
        limits,
        ..RegistryConfig::default()
    })
    .expect("valid config")
}

fn register(registry: &Registry, service: &str, address: &str, now: Instant) -> String {
    registry
        .register(unary(), service, address, BTreeMap::new(), None, now)
        .expect("register")
        .0
        .instance_id
}

fn addresses(registry: &Registry, service: &str) -> Vec<String> {
    registry
        .lookup(service)
        .expect("lookup")
        .instances
        .into_iter()
        .map(|instance| instance.address)
        .collect()
}

#[test]
fn evicts_exactly_when_the_ttl_has_passed() {
    let registry = registry();
    let t0 = Instant::now();
    register(&registry, "logging", "127.0.0.1:50051", t0);

    let just_before = t0 + TTL - Duration::from_millis(1);
    assert!(registry.evict_expired(just_before).is_empty());
    assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);

    let evicted = registry.evict_expired(t0 + TTL);
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].0.address, "127.0.0.1:50051");
    assert_eq!(evicted[0].1, Removal::Expired);
    assert!(addresses(&registry, "logging").is_empty());
    assert_eq!(registry.next_deadline(), None);
}

#[test]
fn heartbeat_extends_the_lease() {
    let registry = registry();
    let t0 = Instant::now();
    let id = register(&registry, "logging", "127.0.0.1:50051", t0);

    let t1 = t0 + Duration::from_secs(2);
    registry.heartbeat(&ANY, &id, t1).expect("heartbeat");
    assert!(registry.evict_expired(t0 + TTL).is_empty(), "extended");
    assert_eq!(registry.next_deadline(), Some(t1 + TTL));
    assert_eq!(registry.evict_expired(t1 + TTL).len(), 1);
}

#[test]
fn heartbeat_for_an_unknown_or_evicted_id_is_not_found() {
    let registry = registry();
    let t0 = Instant::now();
    assert_eq!(
        registry.heartbeat(&ANY, "nope", t0),
        Err(RegistryError::UnknownInstance("nope".into()))
    );
    let id = register(&registry, "logging", "127.0.0.1:50051", t0);
    registry.evict_expired(t0 + TTL);
    assert_eq!(
        registry.heartbeat(&ANY, &id, t0 + TTL),
        Err(RegistryError::UnknownInstance(id))
    );
}

#[test]
fn registering_a_live_address_again_replaces_the_old_entry() {
    let registry = registry();
    let t0 = Instant::now();
    let old = register(&registry, "logging", "127.0.0.1:50051", t0);
    let (lease, replaced) = registry
        .register(
            unary(),
            "logging",
            "127.0.0.1:50051",
            BTreeMap::new(),
            None,
            t0,
        )
        .expect("register");
    assert_eq!(replaced.map(|instance| instance.id), Some(old.clone()));
    let snapshot = registry.lookup("logging").expect("lookup");
    assert_eq!(snapshot.instances.len(), 1);
    assert_eq!(snapshot.instances[0].id, lease.instance_id);
    assert!(
        registry.heartbeat(&ANY, &old, t0).is_err(),
        "old id is gone"
    );
    // The old lease no longer evicts anything early or twice.
    assert_eq!(registry.evict_expired(t0 + TTL).len(), 1);
}

#[test]
fn an_instance_keeps_the_id_it_chose_and_registering_it_again_replaces_it() {
    let registry = registry();
    let t0 = Instant::now();
    let chosen = "logging-7f3a";
    let register_as = |address: &str, at: Instant| {
        registry
            .register(
                unary(),
                "logging",
                address,
                BTreeMap::new(),
                Some(chosen),
                at,
            )
            .expect("register")
            .0
    };
    assert_eq!(register_as("127.0.0.1:50051", t0).instance_id, chosen);
    // Again (a retry whose reply was lost), later, from another address: one entry.
    let t1 = t0 + Duration::from_secs(2);
    register_as("127.0.0.1:50052", t1);
    assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50052"]);
    assert!(
        registry.evict_expired(t0 + TTL).is_empty(),
        "the new lease counts"
    );
    registry
        .heartbeat(&ANY, chosen, t1)
        .expect("heartbeat by the chosen id");
    assert_eq!(registry.len(), 1);
}

#[test]
fn chosen_ids_must_be_printable_short_and_not_a_static_entrys() {
    let registry = registry_with(
        vec![("messages".into(), "127.0.0.1:50060".into())],
        Limits::default(),
    );
    let t0 = Instant::now();
    for bad in ["static-messages-0", "a b", "x\u{0}", &"i".repeat(129)] {
        let result = registry.register(
            unary(),
            "logging",
            "127.0.0.1:1",
            BTreeMap::new(),
            Some(bad),
            t0,
        );
        assert!(
            matches!(result, Err(RegistryError::InvalidInstanceId(_))),
            "{bad:?}: {result:?}"
        );
    }
    assert_eq!(addresses(&registry, "messages"), ["127.0.0.1:50060"]);
}

#[test]
fn static_entries_survive_every_sweep_and_cannot_be_deregistered() {
    let registry = registry_with(
        vec![("messages".into(), "127.0.0.1:50060".into())],
        Limits::default(),
    );
    let far = Instant::now() + Duration::from_secs(3600);
    assert!(registry.evict_expired(far).is_empty());
    let snapshot = registry.lookup("messages").expect("lookup");
    assert_eq!(snapshot.instances.len(), 1);
    assert!(snapshot.instances[0].is_static);
    let id = snapshot.instances[0].id.clone();
    assert_eq!(
        registry.deregister(&ANY, &id),
        Err(RegistryError::StaticInstance(id.clone()))
    );
    assert_eq!(registry.heartbeat(&ANY, &id, far), Ok(()));
}

#[test]
fn unspecified_addresses_are_refused() {
    let registry = registry();
    for address in ["0.0.0.0:50051", "[::]:50051", "[0:0:0:0:0:0:0:0]:50051"] {
        let refused = registry
            .register(
                unary(),
                "logging",
                address,
                BTreeMap::new(),
                None,
                Instant::now(),
            )
            .expect_err(address);
        assert!(
            matches!(refused, RegistryError::UnspecifiedAddress(_)),
            "{address}: {refused}"
        );
        assert!(refused.to_string().contains("--advertise"));
    }
    for address in ["127.0.0.1:50051", "[::1]:50051", "logging-1.internal:50051"] {
        assert!(validate_address(address).is_ok(), "{address}");
    }
}

#[test]
fn a_registration_at_a_static_entrys_address_is_listed_once() {
    let registry = registry_with(
        vec![("messages".into(), "127.0.0.1:50060".into())],
        Limits::default(),
    );
    let now = Instant::now();
    let id = register(&registry, "messages", "127.0.0.1:50060", now);
    let other = register(&registry, "messages", "127.0.0.1:50061", now);
    assert_eq!(
        addresses(&registry, "messages"),
        ["127.0.0.1:50060", "127.0.0.1:50061"]
    );
    let listed = registry.lookup("messages").expect("lookup").instances;
    assert!(
        listed[0].is_static,
        "the static entry stands for the address"
    );
    let (services, _) = registry.list_services();
    assert_eq!(
        services[0].instances.len(),
        2,
        "the status page lists it once too"
    );
    // The registration itself is real: it heartbeats, and deregistering or evicting
    // it leaves the static entry listed.
    assert_eq!(registry.heartbeat(&ANY, &id, now), Ok(()));
    assert!(registry.deregister(&ANY, &id).is_ok());
    registry.evict_expired(now + registry.ttl());
    assert!(registry.heartbeat(&ANY, &other, now).is_err(), "evicted");
    assert_eq!(addresses(&registry, "messages"), ["127.0.0.1:50060"]);
}

#[test]
fn revision_increases_on_every_change_and_only_then() {
    let registry = registry();
    let t0 = Instant::now();
    let changes = registry.subscribe();
    let r0 = *changes.borrow();

    let a = register(&registry, "logging", "127.0.0.1:50051", t0);
    let r1 = registry.lookup("logging").expect("lookup").revision;
    register(&registry, "logging", "127.0.0.1:50052", t0);
    let r2 = registry.lookup("logging").expect("lookup").revision;
    registry.heartbeat(&ANY, &a, t0).expect("heartbeat");
    let r3 = registry.lookup("logging").expect("lookup").revision;
    registry.deregister(&ANY, &a).expect("deregister");
    let r4 = registry.lookup("logging").expect("lookup").revision;
    registry.evict_expired(t0 + TTL);
    let r5 = registry.lookup("logging").expect("lookup").revision;

    assert!(r0 < r1 && r1 < r2, "{r0} {r1} {r2}");
    assert_eq!(r2, r3, "a heartbeat is not a change");
    assert!(r3 < r4 && r4 < r5, "{r3} {r4} {r5}");
    assert_eq!(*changes.borrow(), r5);
}

#[test]
fn deregister_is_immediate_and_unknown_ids_are_not_found() {
    let registry = registry();
    let t0 = Instant::now();
    let id = register(&registry, "logging", "127.0.0.1:50051", t0);
    registry.deregister(&ANY, &id).expect("deregister");
    assert!(addresses(&registry, "logging").is_empty());
    assert_eq!(registry.next_deadline(), None);
    assert_eq!(
        registry.deregister(&ANY, &id),
        Err(RegistryError::UnknownInstance(id))
    );
    assert_eq!(
        registry.deregister(&ANY, ""),
        Err(RegistryError::EmptyInstanceId)
    );
}

#[test]
fn caps_per_service_and_in_total() {
    let registry = registry_with(
        Vec::new(),
        Limits {
            max_instances_per_service: 2,
            max_instances: 3,
        },
    );
    let t0 = Instant::now();
    register(&registry, "a", "h:1", t0);
    register(&registry, "a", "h:2", t0);
    assert!(matches!(
        registry.register(unary(), "a", "h:3", BTreeMap::new(), None, t0),
        Err(RegistryError::ServiceFull { limit: 2, .. })
    ));
    // Replacing a live address is not growth.
    register(&registry, "a", "h:2", t0);
    register(&registry, "b", "h:1", t0);
    assert!(matches!(
        registry.register(unary(), "c", "h:1", BTreeMap::new(), None, t0),
        Err(RegistryError::RegistryFull { limit: 3 })
    ));
}

fn registry_with_grace(grace: Duration) -> Registry {
    Registry::new(RegistryConfig {
        ttl: TTL,
        session_grace: grace,
        ..RegistryConfig::default()
    })
    .expect("valid config")
}

fn register_in(registry: &Registry, session: SessionId, address: &str, now: Instant) {
    registry
        .register(
            Registrant {
                caller: &ANY,
                session: Some(session),
            },
            "logging",
            address,
            BTreeMap::new(),
            Some("logging-1"),
            now,
        )
        .expect("register");
}

#[test]
fn a_lost_session_removes_its_instance_at_once_and_says_why() {
    let registry = registry();
    let t0 = Instant::now();
    register_in(&registry, 7, "127.0.0.1:50051", t0);
    let before = registry.lookup("logging").expect("lookup").revision;

    let end = registry.session_lost("logging-1", 7, t0, registry.session_grace());
    assert!(
        matches!(end, SessionEnd::Removed(ref gone) if gone.id == "logging-1"),
        "{end:?}"
    );
    let after = registry.lookup("logging").expect("lookup");
    assert!(after.instances.is_empty());
    assert!(after.revision > before, "watchers hear of it");
    assert_eq!(registry.next_deadline(), None);
    let removals = registry.removals();
    assert_eq!(removals[0].reason, Removal::ConnectionLost);
    assert_eq!(removals[0].instance.address, "127.0.0.1:50051");
}

#[test]
fn an_instance_held_by_two_sessions_leaves_when_the_last_one_ends() {
    let registry = registry();
    let t0 = Instant::now();
    register_in(&registry, 1, "127.0.0.1:50051", t0);
    // A blip: the instance opened session 2 and registered again before the
    // registry noticed that session 1 had broken.
    register_in(&registry, 2, "127.0.0.1:50051", t0);
    assert_eq!(
        registry.session_lost("logging-1", 1, t0, registry.session_grace()),
        SessionEnd::NotHeld
    );
    assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);
    assert_eq!(
        registry.session_lost("logging-1", 1, t0, registry.session_grace()),
        SessionEnd::NotHeld,
        "ending twice changes nothing"
    );
    assert!(matches!(
        registry.session_lost("logging-1", 2, t0, registry.session_grace()),
        SessionEnd::Removed(_)
    ));
    assert!(addresses(&registry, "logging").is_empty());
}

#[test]
fn a_lost_session_leaves_a_registration_it_no_longer_holds() {
    let registry = registry();
    let t0 = Instant::now();
    register_in(&registry, 1, "127.0.0.1:50051", t0);
    // A unary registration of the id is held by heartbeats alone.
    registry
        .register(
            unary(),
            "logging",
            "127.0.0.1:50051",
            BTreeMap::new(),
            Some("logging-1"),
            t0,
        )
        .expect("register");
    assert_eq!(
        registry.session_lost("logging-1", 1, t0, registry.session_grace()),
        SessionEnd::NotHeld
    );
    assert_eq!(registry.len(), 1);
    assert_eq!(
        registry.session_lost("nobody", 1, t0, registry.session_grace()),
        SessionEnd::NotHeld
    );
}

#[test]
fn with_a_grace_a_lost_session_is_removed_when_the_grace_ends_unless_it_comes_back() {
    let grace = Duration::from_millis(500);
    let registry = registry_with_grace(grace);
    let t0 = Instant::now();
    register_in(&registry, 1, "127.0.0.1:50051", t0);
    assert!(matches!(
        registry.session_lost("logging-1", 1, t0, registry.session_grace()),
        SessionEnd::Grace(_)
    ));
    assert_eq!(registry.next_deadline(), Some(t0 + grace), "moved earlier");
    assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);
    let evicted = registry.evict_expired(t0 + grace);
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].1, Removal::ConnectionLost);

    // Back within the grace: a new session holds it, and the old deadline is gone.
    register_in(&registry, 2, "127.0.0.1:50051", t0);
    registry.session_lost("logging-1", 2, t0, registry.session_grace());
    register_in(&registry, 3, "127.0.0.1:50051", t0 + grace / 2);
    assert!(registry.evict_expired(t0 + grace).is_empty());
    assert_eq!(registry.next_deadline(), Some(t0 + grace / 2 + TTL));
}

#[test]
fn a_session_whose_lease_ran_out_is_evicted_by_the_ttl_and_may_register_again() {
    let registry = registry();
    let t0 = Instant::now();
    register_in(&registry, 1, "127.0.0.1:50051", t0);
    // A hang: the session stays open, but no heartbeat comes.
    let evicted = registry.evict_expired(t0 + TTL);
    assert_eq!(evicted[0].1, Removal::Expired);
    assert_eq!(
        registry.heartbeat(&ANY, "logging-1", t0 + TTL),
        Err(RegistryError::UnknownInstance("logging-1".into()))
    );
    register_in(&registry, 1, "127.0.0.1:50051", t0 + TTL);
    assert_eq!(addresses(&registry, "logging"), ["127.0.0.1:50051"]);
}

#[test]
fn lookup_of_an_unknown_service_is_empty_and_revisions_never_go_back() {
    let registry = registry();
    let t0 = Instant::now();
    let id = register(&registry, "logging", "127.0.0.1:50051", t0);
    let before = registry.lookup("logging").expect("lookup").revision;
    registry.deregister(&ANY, &id).expect("deregister");
    let after = registry.lookup("logging").expect("lookup");
    assert!(after.instances.is_empty());
    assert!(after.revision > before);
}

fn cert(name: &str) -> Caller {
    Caller::Certificate(rpc::Identity::new(name))
}

#[test]
fn nobody_but_its_owner_registers_heartbeats_or_deregisters_an_instance() {
    let registry = registry();
    let now = Instant::now();
    let (owner, thief) = (cert("logging@a"), cert("logging@d"));
    let register = |caller: &Caller, address: &str, id: &str| {
        registry.register(
            Registrant {
                caller,
                session: None,
            },
            "logging",
            address,
            BTreeMap::new(),
            Some(id),
            now,
        )
    };
    register(&owner, "10.0.0.1:50051", "logging-a").expect("registered");

    fn denied<T>(result: Result<T, RegistryError>) -> bool {
        matches!(result, Err(RegistryError::Denied(Denied::NotOwner { .. })))
    }
    assert!(
        denied(register(&thief, "10.0.0.4:50051", "logging-a")),
        "the id"
    );
    assert!(
        denied(register(&thief, "10.0.0.1:50051", "logging-d")),
        "the address"
    );
    assert!(denied(registry.heartbeat(&thief, "logging-a", now)));
    assert!(denied(registry.deregister(&thief, "logging-a")));
    assert!(denied(registry.deregister(&Caller::Anyone, "logging-a")));
    assert_eq!(addresses(&registry, "logging"), ["10.0.0.1:50051"]);

    registry
        .heartbeat(&owner, "logging-a", now)
        .expect("its owner");
    register(&owner, "10.0.0.1:50052", "logging-a").expect("its owner moves it");
    registry.deregister(&owner, "logging-a").expect("its owner");
    register(&thief, "10.0.0.4:50051", "logging-a").expect("a free id is anyone's");
}

#[test]
fn a_certificate_registers_its_service_and_only_replicas_register_the_registry() {
    let registry = registry();
    let now = Instant::now();
    let register = |caller: &Caller, service: &str| {
        registry.register(
            Registrant {
                caller,
                session: None,
            },
            service,
            "10.0.0.1:1",
            BTreeMap::new(),
            None,
            now,
        )
    };
    for (caller, service) in [
        (cert("logging@a"), "messages"),
        (cert("logging@a"), "config-server"),
        (Caller::Token, "config-server"),
        (Caller::Anyone, "config-server"),
    ] {
        let result = register(&caller, service);
        assert!(
            matches!(result, Err(RegistryError::Denied(Denied::Service { .. }))),
            "{caller} registering {service}: {result:?}"
        );
    }
    assert!(registry
        .lookup("config-server")
        .expect("lookup")
        .instances
        .is_empty());
    register(&cert("config-server@b"), "config-server").expect("a replica");
}

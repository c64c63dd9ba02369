//! Tests of the test API server through the real kube client.

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::discovery::{Discovery, Scope as KubeScope};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::{json, Value};

use super::TestApiServer;

async fn server() -> (TestApiServer, kube::Client) {
    let server = TestApiServer::start().await.expect("start test API server");
    let client = server.client();
    (server, client)
}

/// Poll `f` every 20 ms until it yields `Some`, for at most `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn api_error(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn ensure_namespace(client: &kube::Client, name: &str) {
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.patch(
        name,
        &PatchParams::apply("roost"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})),
    )
    .await
    .expect("apply namespace");
}

fn deployment(name: &str, image: &str, extra_spec: Value) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image, "ports": [{"containerPort": 8080}]}]}
            }
        }
    });
    if let (Some(spec), Some(extra)) = (d["spec"].as_object_mut(), extra_spec.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    d
}

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}}
            }]
        }
    })
}

fn managers(obj: &impl kube::Resource) -> Vec<(String, String)> {
    obj.meta()
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn fields_of(obj: &impl kube::Resource, manager: &str) -> Value {
    obj.meta()
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some(manager))
        .and_then(|m| m.fields_v1.as_ref())
        .map(|f| f.0.clone())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn discovery_finds_builtins_and_established_crds() {
    let (_server, client) = server().await;
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"))
        .expect("apps/v1 Deployment discovered");
    assert_eq!(ar.plural, "deployments");
    assert_eq!(caps.scope, KubeScope::Namespaced);
    let (ns_ar, ns_caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"))
        .expect("v1 Namespace discovered");
    assert_eq!(ns_ar.plural, "namespaces");
    assert_eq!(ns_caps.scope, KubeScope::Cluster);
    assert!(discovery
        .resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget"))
        .is_none());

    // A custom resource before its CRD exists: 404 like a real server.
    ensure_namespace(&client, "apps").await;
    let widget_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "apps", &widget_ar);
    let widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}});
    let err = widgets
        .patch("w1", &PatchParams::apply("roost"), &Patch::Apply(&widget))
        .await
        .expect_err("no CRD yet");
    assert_eq!(api_error(err).code, 404);

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "widgets.example.com",
        &PatchParams::apply("roost"),
        &Patch::Apply(widget_crd()),
    )
    .await
    .expect("apply CRD");
    let established = eventually(3, "CRD established", || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("widgets.example.com").await.ok()?;
            let conds = crd.status?.conditions?;
            let ok = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
            (ok("Established") && ok("NamesAccepted")).then_some(())
        }
    });
    established.await;

    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget"))
        .expect("Widget discovered after the CRD is established");
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, KubeScope::Namespaced);

    let applied = widgets
        .patch("w1", &PatchParams::apply("roost"), &Patch::Apply(&widget))
        .await
        .expect("apply widget");
    assert_eq!(applied.metadata.generation, Some(1));
    assert_eq!(applied.data["spec"]["size"], 3);
    let listed = widgets
        .list(&ListParams::default())
        .await
        .expect("list widgets");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].types.as_ref().map(|t| t.kind.as_str()),
        Some("Widget")
    );
    widgets
        .delete("w1", &DeleteParams::default())
        .await
        .expect("delete widget");
    let err = widgets.get("w1").await.expect_err("deleted");
    assert_eq!(api_error(err).reason, "NotFound");
}

#[tokio::test]
async fn server_side_apply_tracks_generation_and_managers() {
    let (_server, client) = server().await;
    ensure_namespace(&client, "apps").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "apps");
    let pp = PatchParams::apply("roost").force();

    let d = deploys
        .patch(
            "web",
            &pp,
            &Patch::Apply(deployment("web", "nginx:1.27", json!({}))),
        )
        .await
        .expect("create by apply");
    assert_eq!(d.metadata.generation, Some(1));
    assert!(d.metadata.uid.is_some());
    assert!(d.metadata.creation_timestamp.is_some());
    // Defaults of a real server, not owned by roost.
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(1));
    assert_eq!(
        managers(&d),
        vec![("roost".to_string(), "Apply".to_string())]
    );
    let f = fields_of(&d, "roost");
    assert!(
        f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["f:image"]
            .is_object()
    );
    assert!(f["f:spec"].get("f:replicas").is_none());
    assert!(f["f:spec"]["f:selector"].is_object());

    // Same manifest again: nothing changes, not even the resourceVersion (once the
    // controller, which also writes the object, is done with the rollout).
    let settled = eventually(3, "rollout done", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("web").await.ok()?;
            let available = d.status.as_ref()?.available_replicas == Some(1);
            available.then_some(d)
        }
    })
    .await;
    let again = deploys
        .patch(
            "web",
            &pp,
            &Patch::Apply(deployment("web", "nginx:1.27", json!({}))),
        )
        .await
        .expect("re-apply");
    assert_eq!(
        again.metadata.resource_version,
        settled.metadata.resource_version
    );

    // A metadata-only change does not bump generation.
    let mut labelled = deployment("web", "nginx:1.27", json!({}));
    labelled["metadata"]["labels"]["tier"] = json!("frontend");
    let l = deploys
        .patch("web", &pp, &Patch::Apply(&labelled))
        .await
        .expect("label");
    assert_eq!(l.metadata.generation, Some(1));
    assert_ne!(l.metadata.resource_version, d.metadata.resource_version);

    // A spec change does.
    let mut changed = labelled.clone();
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.28");
    let c = deploys
        .patch("web", &pp, &Patch::Apply(&changed))
        .await
        .expect("image");
    assert_eq!(c.metadata.generation, Some(2));

    // The controller's status writes are their own manager on the status subresource.
    let with_status = eventually(3, "controller status", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("web").await.ok()?;
            let ok = d.status.as_ref()?.observed_generation == Some(2);
            ok.then_some(d)
        }
    })
    .await;
    assert_eq!(with_status.metadata.generation, Some(2));
    assert!(with_status
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some("kube-controller-manager")
            && m.subresource.as_deref() == Some("status")));
}

#[tokio::test]
async fn conflicting_apply_needs_force() {
    let (_server, client) = server().await;
    ensure_namespace(&client, "apps").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "apps");
    deploys
        .patch(
            "web",
            &PatchParams::apply("roost").force(),
            &Patch::Apply(deployment("web", "nginx", json!({"replicas": 2}))),
        )
        .await
        .expect("roost applies");

    let other = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"}, "spec": {"replicas": 3}
    });
    let err = deploys
        .patch("web", &PatchParams::apply("other"), &Patch::Apply(&other))
        .await
        .expect_err("conflict");
    let status = api_error(err);
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "Conflict");
    assert!(
        status.message.contains("conflict with \"roost\""),
        "{}",
        status.message
    );
    let causes = status.details.expect("details").causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].field, ".spec.replicas");
    assert_eq!(causes[0].reason, "FieldManagerConflict");

    // Same value: shared ownership, no conflict.
    let same = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}});
    deploys
        .patch("web", &PatchParams::apply("other"), &Patch::Apply(&same))
        .await
        .expect("same value is not a conflict");

    let won = deploys
        .patch(
            "web",
            &PatchParams::apply("other").force(),
            &Patch::Apply(&other),
        )
        .await
        .expect("force wins");
    assert_eq!(won.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert!(fields_of(&won, "roost")["f:spec"]
        .get("f:replicas")
        .is_none());
    assert!(fields_of(&won, "other")["f:spec"]["f:replicas"].is_object());

    // Now roost is the one in conflict.
    let err = deploys
        .patch(
            "web",
            &PatchParams::apply("roost"),
            &Patch::Apply(deployment("web", "nginx", json!({"replicas": 2}))),
        )
        .await
        .expect_err("roost conflicts with other");
    assert!(api_error(err).message.contains("\"other\""));
}

#[tokio::test]
async fn pruning_and_foreign_fields() {
    let (_server, client) = server().await;
    ensure_namespace(&client, "apps").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "apps");
    let pp = PatchParams::apply("roost").force();
    let mut manifest = deployment("web", "nginx", json!({}));
    manifest["metadata"]["labels"]["extra"] = json!("yes");
    manifest["metadata"]["annotations"] = json!({"note": "x"});
    manifest["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "sidecar", "image": "busybox"}));
    deploys
        .patch("web", &pp, &Patch::Apply(&manifest))
        .await
        .expect("apply");

    // Someone scales it with a merge patch (operation Update).
    let scaled = deploys
        .patch(
            "web",
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(scaled.spec.as_ref().and_then(|s| s.replicas), Some(5));
    assert!(managers(&scaled).contains(&("kubectl-edit".to_string(), "Update".to_string())));

    // roost drops the label, the annotation and the sidecar; replicas was never roost's.
    let slim = deployment("web", "nginx", json!({}));
    let d = deploys
        .patch("web", &pp, &Patch::Apply(&slim))
        .await
        .expect("re-apply");
    let labels = d.metadata.labels.clone().unwrap_or_default();
    assert!(!labels.contains_key("extra"), "{labels:?}");
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
    assert!(d
        .metadata
        .annotations
        .as_ref()
        .is_none_or(|a| !a.contains_key("note")));
    let containers = &d
        .spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers;
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].name, "app");
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(5));

    // A field roost owned alone and drops goes back to the server default.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}});
    cms.patch("cfg", &pp, &Patch::Apply(&cm)).await.expect("cm");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1"}});
    let c = cms
        .patch("cfg", &pp, &Patch::Apply(&cm))
        .await
        .expect("cm again");
    let data = c.data.unwrap_or_default();
    assert_eq!(data.len(), 1);
    assert_eq!(data.get("a").map(String::as_str), Some("1"));
}

#[tokio::test]
async fn dry_run_apply_does_not_store() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}, "data": {"a": "1"}});
    let preview = cms
        .patch(
            "dry",
            &PatchParams::apply("roost").dry_run(),
            &Patch::Apply(&cm),
        )
        .await
        .expect("dry-run create");
    assert_eq!(
        preview
            .data
            .as_ref()
            .and_then(|d| d.get("a"))
            .map(String::as_str),
        Some("1")
    );
    assert_eq!(
        api_error(cms.get("dry").await.expect_err("not stored")).code,
        404
    );

    let stored = cms
        .patch("dry", &PatchParams::apply("roost"), &Patch::Apply(&cm))
        .await
        .expect("create");
    let cm2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}, "data": {"a": "2"}});
    let preview = cms
        .patch(
            "dry",
            &PatchParams::apply("roost").dry_run(),
            &Patch::Apply(&cm2),
        )
        .await
        .expect("dry-run update");
    assert_eq!(
        preview
            .data
            .as_ref()
            .and_then(|d| d.get("a"))
            .map(String::as_str),
        Some("2")
    );
    let now = cms.get("dry").await.expect("get");
    assert_eq!(
        now.data
            .as_ref()
            .and_then(|d| d.get("a"))
            .map(String::as_str),
        Some("1")
    );
    assert_eq!(
        now.metadata.resource_version,
        stored.metadata.resource_version
    );
}

fn labelled_cm(name: &str, app: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": app}}, "data": {"v": value}})
}

#[tokio::test]
async fn list_and_watch_with_label_selector() {
    let (_server, client) = server().await;
    ensure_namespace(&client, "w").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let pp = PatchParams::apply("roost");
    cms.patch("a", &pp, &Patch::Apply(labelled_cm("a", "roost", "1")))
        .await
        .expect("a");
    cms.patch("b", &pp, &Patch::Apply(labelled_cm("b", "other", "1")))
        .await
        .expect("b");

    let listed = cms
        .list(&ListParams::default().labels("app=roost"))
        .await
        .expect("list");
    let names: Vec<String> = listed.items.iter().map(|c| c.name_any()).collect();
    assert_eq!(names, vec!["a"]);
    let list_rv = listed.metadata.resource_version.clone().expect("list rv");
    let all = cms
        .list(&ListParams::default().labels("app in (roost,other),!missing"))
        .await
        .expect("set-based");
    assert_eq!(all.items.len(), 2);
    // Cluster-wide list sees the same objects plus other namespaces' (kube-root-ca.crt).
    let everywhere: Api<ConfigMap> = Api::all(client.clone());
    let across = everywhere
        .list(&ListParams::default().labels("app=roost"))
        .await
        .expect("all ns");
    assert_eq!(across.items.len(), 1);
    // Pagination.
    let page = everywhere
        .list(&ListParams::default().limit(1))
        .await
        .expect("page");
    assert_eq!(page.items.len(), 1);
    assert!(page.metadata.continue_.is_some());

    // A raw watch from the list's resourceVersion.
    let stream = cms
        .watch(
            &WatchParams::default().labels("app=roost").timeout(10),
            &list_rv,
        )
        .await
        .expect("watch");
    let mut stream = stream.boxed();
    cms.patch("c", &pp, &Patch::Apply(labelled_cm("c", "roost", "1")))
        .await
        .expect("c");
    cms.patch("b", &pp, &Patch::Apply(labelled_cm("b", "other", "2")))
        .await
        .expect("b2");
    cms.patch("a", &pp, &Patch::Apply(labelled_cm("a", "roost", "2")))
        .await
        .expect("a2");
    // Relabelling out of the selector is a DELETED for this watch.
    cms.patch("c", &pp, &Patch::Apply(labelled_cm("c", "gone", "1")))
        .await
        .expect("c2");
    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(3), stream.try_next())
            .await
            .expect("watch event in time")
            .expect("watch ok")
            .expect("stream open");
        match ev {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.name_any())),
            WatchEvent::Modified(o) => seen.push(format!("MODIFIED {}", o.name_any())),
            WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        seen,
        vec!["ADDED c", "MODIFIED a", "DELETED c", "DELETED a"]
    );

    // kube-runtime's watcher in its default list-then-watch mode.
    let mut events = watcher(cms.clone(), watcher::Config::default().labels("app=roost"))
        .default_backoff()
        .boxed();
    let mut init_done = false;
    while !init_done {
        match tokio::time::timeout(Duration::from_secs(3), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitDone))) => init_done = true,
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher init: {other:?}"),
        }
    }
    cms.patch("d", &pp, &Patch::Apply(labelled_cm("d", "roost", "1")))
        .await
        .expect("d");
    cms.delete("d", &DeleteParams::default())
        .await
        .expect("delete d");
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(3), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::Apply(o)))) => got.push(format!("apply {}", o.name_any())),
            Ok(Ok(Some(watcher::Event::Delete(o)))) => got.push(format!("delete {}", o.name_any())),
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher event: {other:?}"),
        }
    }
    assert_eq!(got, vec!["apply d", "delete d"]);
}

#[tokio::test]
async fn expired_resource_version_is_gone() {
    let (server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PatchParams::apply("roost");
    let first = cms
        .patch("x", &pp, &Patch::Apply(labelled_cm("x", "roost", "1")))
        .await
        .expect("x");
    let old_rv = first.metadata.resource_version.expect("rv");
    cms.patch("x", &pp, &Patch::Apply(labelled_cm("x", "roost", "2")))
        .await
        .expect("x2");
    server.compact();
    let mut stream = cms
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(3), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Error(e)))) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn deployments_become_available_unless_told_otherwise() {
    let (server, client) = server().await;
    ensure_namespace(&client, "apps").await;
    server.never_available("apps", "stuck");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "apps");
    let pp = PatchParams::apply("roost").force();
    deploys
        .patch(
            "ok",
            &pp,
            &Patch::Apply(deployment("ok", "nginx", json!({"replicas": 2}))),
        )
        .await
        .expect("ok");
    deploys
        .patch(
            "stuck",
            &pp,
            &Patch::Apply(deployment(
                "stuck",
                "nginx",
                json!({"replicas": 2, "progressDeadlineSeconds": 1}),
            )),
        )
        .await
        .expect("stuck");
    let cond = |d: &Deployment, t: &str| -> Option<String> {
        d.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
    };
    let ok = eventually(3, "ok available", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("ok").await.ok()?;
            (cond(&d, "Available").as_deref() == Some("True")).then_some(d)
        }
    })
    .await;
    let status = ok.status.as_ref().expect("status");
    assert_eq!(status.observed_generation, ok.metadata.generation);
    assert_eq!(status.available_replicas, Some(2));
    assert_eq!(status.ready_replicas, Some(2));
    assert_eq!(status.updated_replicas, Some(2));
    assert_eq!(status.unavailable_replicas, None);
    let progressing = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")
        .expect("progressing");
    assert_eq!(
        progressing.reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );

    let stuck = eventually(3, "stuck observed", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("stuck").await.ok()?;
            let observed = d.status.as_ref()?.observed_generation == d.metadata.generation;
            observed.then_some(d)
        }
    })
    .await;
    assert_eq!(cond(&stuck, "Available").as_deref(), Some("False"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stuck = deploys.get("stuck").await.expect("stuck");
    assert_eq!(cond(&stuck, "Available").as_deref(), Some("False"));
    let status = stuck.status.expect("status");
    assert_eq!(status.available_replicas, None);
    assert_eq!(status.replicas, Some(2));
    assert_eq!(status.unavailable_replicas, Some(2));
    // After spec.progressDeadlineSeconds the rollout is reported as failed.
    eventually(3, "progress deadline exceeded", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("stuck").await.ok()?;
            let c = d
                .status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "Progressing")?;
            (c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
                .then_some(())
        }
    })
    .await;

    // Scaled to zero: zero-valued fields are absent, Available stays True.
    let zero = deploys
        .patch(
            "ok",
            &pp,
            &Patch::Apply(deployment("ok", "nginx", json!({"replicas": 0}))),
        )
        .await
        .expect("scale to 0");
    let zero_gen = zero.metadata.generation;
    let z = eventually(3, "scaled to zero", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("ok").await.ok()?;
            let s = d.status.as_ref()?;
            (s.observed_generation == zero_gen && s.replicas.is_none()).then_some(d)
        }
    })
    .await;
    assert_eq!(cond(&z, "Available").as_deref(), Some("True"));
}

#[tokio::test]
async fn namespace_delete_cascades() {
    let (_server, client) = server().await;
    ensure_namespace(&client, "doomed").await;
    let pp = PatchParams::apply("roost");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    cms.patch("c", &pp, &Patch::Apply(labelled_cm("c", "roost", "1")))
        .await
        .expect("cm");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "doomed");
    deploys
        .patch(
            "web",
            &pp,
            &Patch::Apply(deployment("web", "nginx", json!({}))),
        )
        .await
        .expect("deploy");

    let nss: Api<Namespace> = Api::all(client.clone());
    let deleted = nss
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete ns");
    let ns = deleted.left().expect("namespace object while terminating");
    assert_eq!(
        ns.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Terminating")
    );
    assert!(ns.metadata.deletion_timestamp.is_some());

    // No new content in a terminating namespace.
    let err = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(labelled_cm("late", "roost", "1")).expect("cm"),
        )
        .await
        .expect_err("forbidden");
    let err = api_error(err);
    assert_eq!(err.code, 403);

    eventually(3, "namespace gone", || {
        let nss = nss.clone();
        async move { nss.get("doomed").await.err().map(|_| ()) }
    })
    .await;
    assert_eq!(
        api_error(cms.get("c").await.expect_err("cm gone")).code,
        404
    );
    assert_eq!(
        api_error(deploys.get("web").await.expect_err("deploy gone")).code,
        404
    );
    // Applying into it now fails like on a real server.
    let err = cms
        .patch("c", &pp, &Patch::Apply(labelled_cm("c", "roost", "1")))
        .await
        .expect_err("namespace missing");
    let err = api_error(err);
    assert_eq!(err.code, 404);
    assert_eq!(err.message, "namespaces \"doomed\" not found");
}

#[tokio::test]
async fn errors_are_status_objects() {
    let (server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let missing = api_error(cms.get("nope").await.expect_err("missing"));
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "configmaps \"nope\" not found");

    let http = raw_http(&server);
    // Apply without fieldManager.
    let (code, body) = http
        .patch(
            "/api/v1/namespaces/default/configmaps/x",
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
        )
        .await;
    assert_eq!(code, 422, "{body}");
    // YAML apply with a manager works.
    let (code, body) = http
        .patch(
            "/api/v1/namespaces/default/configmaps/x?fieldManager=roost",
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  k: v\n",
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["data"]["k"], "v");
    // apiVersion that does not match the URL.
    let (code, body) = http
        .patch(
            "/apis/apps/v1/namespaces/default/deployments/x?fieldManager=roost",
            "application/apply-patch+yaml",
            "apiVersion: apps/v2\nkind: Deployment\nmetadata:\n  name: x\n",
        )
        .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (400, Some("BadRequest")),
        "{body}"
    );
    // Missing name.
    let (code, body) = http
        .patch(
            "/api/v1/namespaces/default/configmaps/x?fieldManager=roost",
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
        )
        .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (422, Some("Invalid")),
        "{body}"
    );
    // Invalid Deployment (selector does not match the template).
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let mut bad = deployment("bad", "nginx", json!({}));
    bad["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    let err = api_error(
        deploys
            .patch("bad", &PatchParams::apply("roost"), &Patch::Apply(&bad))
            .await
            .expect_err("invalid"),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    // Unknown resource: the mux's plain-text 404, as for a CRD that is not installed.
    let (code, body) = http
        .get("/apis/example.com/v1/namespaces/default/widgets")
        .await;
    assert_eq!((code, body), (404, Value::Null));
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let err = api_error(widgets.get("w").await.expect_err("no such kind"));
    assert_eq!(err.code, 404);
    assert_eq!(err.message, "404 page not found");
}

#[tokio::test]
async fn kubeconfig_points_at_the_server() {
    let (server, _client) = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).expect("client");
    let nss: Api<Namespace> = Api::all(client);
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert!(names.contains(&"default".to_string()), "{names:?}");
}

#[tokio::test]
async fn foreground_delete_and_owner_references() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PatchParams::apply("roost");
    let owner = cms
        .patch(
            "owner",
            &pp,
            &Patch::Apply(labelled_cm("owner", "roost", "1")),
        )
        .await
        .expect("owner");
    let uid = owner.metadata.uid.clone().expect("uid");
    let mut child = labelled_cm("child", "roost", "1");
    child["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]);
    cms.patch("child", &pp, &Patch::Apply(&child))
        .await
        .expect("child");
    let res = cms
        .delete("owner", &DeleteParams::foreground())
        .await
        .expect("delete");
    let pending = res.left().expect("foreground delete answers the object");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert!(pending
        .finalizers()
        .contains(&"foregroundDeletion".to_string()));
    eventually(3, "owner and child gone", || {
        let cms = cms.clone();
        async move {
            let owner_gone = cms.get("owner").await.is_err();
            let child_gone = cms.get("child").await.is_err();
            (owner_gone && child_gone).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn updates_subresources_and_kind_specifics() {
    let (_server, client) = server().await;
    let pp = PatchParams::apply("roost");

    // PUT with a stale resourceVersion conflicts; with the current one it succeeds.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = cms
        .patch("put", &pp, &Patch::Apply(labelled_cm("put", "roost", "1")))
        .await
        .expect("cm");
    let mut stale = cm.clone();
    stale.metadata.resource_version = Some("1".into());
    let err = api_error(
        cms.replace("put", &PostParams::default(), &stale)
            .await
            .expect_err("stale"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    let mut fresh = cm.clone();
    fresh.data = Some([("v".to_string(), "2".to_string())].into_iter().collect());
    let replaced = cms
        .replace("put", &PostParams::default(), &fresh)
        .await
        .expect("replace");
    assert_eq!(
        replaced
            .data
            .unwrap_or_default()
            .get("v")
            .map(String::as_str),
        Some("2")
    );

    // Main-resource writes ignore status; the status subresource only takes status.
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let mut d = deployment("st", "nginx", json!({}));
    d["status"] = json!({"replicas": 42});
    let created = deploys
        .patch("st", &pp, &Patch::Apply(&d))
        .await
        .expect("deploy");
    assert_ne!(created.status.as_ref().and_then(|s| s.replicas), Some(42));
    let patched = deploys
        .patch_status(
            "st",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 9}, "status": {"collisionCount": 3}})),
        )
        .await
        .expect("patch status");
    assert_eq!(
        patched.status.as_ref().and_then(|s| s.collision_count),
        Some(3)
    );
    assert_eq!(patched.spec.as_ref().and_then(|s| s.replicas), Some(1));

    // Secrets: stringData is written into data.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    let s = secrets
        .patch(
            "sec",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"k": "v"}})),
        )
        .await
        .expect("secret");
    assert_eq!(s.type_.as_deref(), Some("Opaque"));
    assert_eq!(
        s.data.unwrap_or_default().get("k").map(|b| b.0.clone()),
        Some(b"v".to_vec())
    );
    assert!(s.string_data.is_none());

    // Services get a cluster IP; LoadBalancers stay pending (no cloud provider).
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), "default");
    let svc = svcs
        .patch(
            "lb",
            &pp,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
                "spec": {"type": "LoadBalancer", "selector": {"app": "x"}, "ports": [{"port": 80}]}})),
        )
        .await
        .expect("service");
    let spec = svc.spec.expect("spec");
    assert!(spec.cluster_ip.is_some_and(|ip| ip.starts_with("10.96.")));
    assert!(spec.ports.unwrap_or_default()[0].node_port.is_some());
    assert!(svc
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .is_none());

    // PVCs bind without a provisioner.
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), "default");
    pvcs.patch(
        "data",
        &pp,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})),
    )
    .await
    .expect("pvc");
    eventually(3, "pvc bound", || {
        let pvcs = pvcs.clone();
        async move {
            let p = pvcs.get("data").await.ok()?;
            (p.status?.phase.as_deref() == Some("Bound")).then_some(())
        }
    })
    .await;

    // Jobs complete.
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), "default");
    jobs.patch(
        "once",
        &pp,
        &Patch::Apply(json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}})),
    )
    .await
    .expect("job");
    eventually(3, "job complete", || {
        let jobs = jobs.clone();
        async move {
            let j = jobs.get("once").await.ok()?;
            let done = j
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True");
            done.then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn deleting_a_crd_removes_its_instances_and_kind() {
    let (_server, client) = server().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "widgets.example.com",
        &PatchParams::apply("roost"),
        &Patch::Apply(widget_crd()),
    )
    .await
    .expect("crd");
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let w = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}});
    eventually(3, "widget applied", || {
        let widgets = widgets.clone();
        let w = w.clone();
        async move {
            widgets
                .patch("w", &PatchParams::apply("roost"), &Patch::Apply(&w))
                .await
                .ok()
        }
    })
    .await;
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .expect("delete crd");
    eventually(3, "crd gone", || {
        let crds = crds.clone();
        async move { crds.get("widgets.example.com").await.err().map(|_| ()) }
    })
    .await;
    let err = api_error(widgets.get("w").await.expect_err("kind gone"));
    assert_eq!(err.code, 404);
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    assert!(discovery
        .resolve_gvk(&GroupVersionKind::gvk("example.com", "v1", "Widget"))
        .is_none());
}

/// A tiny raw HTTP helper for requests the typed client cannot make.
struct RawHttp {
    client: kube::Client,
}

fn raw_http(server: &TestApiServer) -> RawHttp {
    RawHttp {
        client: server.client(),
    }
}

impl RawHttp {
    async fn send(&self, req: axum::http::Request<Vec<u8>>) -> (u16, Value) {
        let res = self
            .client
            .send(req.map(kube::client::Body::from))
            .await
            .expect("request sent");
        let code = res.status().as_u16();
        let bytes = res.into_body().collect_bytes().await.expect("body");
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let req = axum::http::Request::get(path)
            .body(vec![])
            .expect("request");
        self.send(req).await
    }

    async fn patch(&self, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        let req = axum::http::Request::patch(path)
            .header("content-type", content_type)
            .body(body.as_bytes().to_vec())
            .expect("request");
        self.send(req).await
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        let req = axum::http::Request::put(path)
            .header("content-type", "application/json")
            .body(body.to_string().into_bytes())
            .expect("request");
        self.send(req).await
    }
}

#[tokio::test]
async fn streaming_list_watch_and_bookmarks() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PatchParams::apply("roost");
    cms.patch("s1", &pp, &Patch::Apply(labelled_cm("s1", "stream", "1")))
        .await
        .expect("s1");

    // kube-runtime's watcher in streaming-list mode (sendInitialEvents + initial-events-end bookmark).
    let mut events = watcher(
        cms.clone(),
        watcher::Config::default()
            .labels("app=stream")
            .streaming_lists(),
    )
    .default_backoff()
    .boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitApply(o)))) => initial.push(o.name_any()),
            Ok(Ok(Some(watcher::Event::InitDone))) => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("streaming list: {other:?}"),
        }
    }
    assert_eq!(initial, vec!["s1"]);
    cms.patch("s1", &pp, &Patch::Apply(labelled_cm("s1", "stream", "2")))
        .await
        .expect("s1 v2");
    match tokio::time::timeout(Duration::from_secs(3), events.try_next()).await {
        Ok(Ok(Some(watcher::Event::Apply(o)))) => {
            assert_eq!(
                o.data.unwrap_or_default().get("v").map(String::as_str),
                Some("2")
            );
        }
        other => panic!("streaming watch update: {other:?}"),
    }

    // Bookmarks arrive on an idle watch that allows them.
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(3), stream.try_next()).await {
        Ok(Ok(Some(WatchEvent::Bookmark(b)))) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

fn dynamic_api(
    client: &kube::Client,
    group: &str,
    kind: &str,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1", kind));
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// Apply `obj` with `metadata` entries replaced by `meta` (labels/annotations), and
/// return the stored generation.
async fn apply_generation(api: &Api<DynamicObject>, obj: &Value, meta: Value) -> Option<i64> {
    let mut o = obj.clone();
    if let (Some(m), Some(extra)) = (o["metadata"].as_object_mut(), meta.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    let name = o["metadata"]["name"].as_str().expect("name").to_string();
    api.patch(
        &name,
        &PatchParams::apply("roost").force(),
        &Patch::Apply(&o),
    )
    .await
    .expect("apply")
    .metadata
    .generation
}

#[tokio::test]
async fn deployment_generation_counts_annotations_but_not_labels() {
    let (_server, client) = server().await;
    let deploys = dynamic_api(&client, "apps", "Deployment", Some("default"));
    let d = deployment("web", "nginx:1.27", json!({"replicas": 0}));
    assert_eq!(apply_generation(&deploys, &d, json!({})).await, Some(1));
    // Labels are not copied to ReplicaSets: no new generation.
    let labels = json!({"labels": {"app": "web", "tier": "frontend"}});
    assert_eq!(
        apply_generation(&deploys, &d, labels.clone()).await,
        Some(1)
    );
    // Annotations are: every change (added, changed, removed) is a new generation.
    let annotated = |v: &str| json!({"labels": {"app": "web", "tier": "frontend"}, "annotations": {"roost.dev/revision": v}});
    assert_eq!(
        apply_generation(&deploys, &d, annotated("a")).await,
        Some(2)
    );
    assert_eq!(
        apply_generation(&deploys, &d, annotated("a")).await,
        Some(2)
    );
    assert_eq!(
        apply_generation(&deploys, &d, annotated("b")).await,
        Some(3)
    );
    assert_eq!(apply_generation(&deploys, &d, labels).await, Some(4));
    // Other writers count too (merge patch, operation Update).
    let patched = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"note": "x"}}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(patched.metadata.generation, Some(5));
    let patched = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"more": "y"}}})),
        )
        .await
        .expect("merge patch labels");
    assert_eq!(patched.metadata.generation, Some(5));

    // The controller's revision annotation goes through the status subresource: it is
    // recorded there and does not bump the generation, so the rollout is observed.
    let observed = eventually(3, "deployment observed", || {
        let deploys = deploys.clone();
        async move {
            let d = deploys.get("web").await.ok()?;
            let done = d.data["status"]["observedGeneration"] == json!(5)
                && d.annotations()
                    .contains_key("deployment.kubernetes.io/revision");
            done.then_some(d)
        }
    })
    .await;
    assert_eq!(observed.metadata.generation, Some(5));
    let kcm = observed
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| {
            m.manager.as_deref() == Some("kube-controller-manager")
                && m.subresource.as_deref() == Some("status")
        })
        .expect("controller status entry");
    let fields = serde_json::to_value(kcm.fields_v1.as_ref().expect("fieldsV1")).expect("json");
    assert!(
        fields["f:metadata"]["f:annotations"]["f:deployment.kubernetes.io/revision"].is_object(),
        "{fields}"
    );
    // A status write by a client may set annotations on a Deployment too, but not labels.
    let status_patch = deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"by-status": "1"}, "labels": {"by-status": "1"}}})),
        )
        .await
        .expect("status patch");
    assert_eq!(
        status_patch
            .annotations()
            .get("by-status")
            .map(String::as_str),
        Some("1")
    );
    assert!(!status_patch.labels().contains_key("by-status"));
    assert_eq!(status_patch.metadata.generation, Some(5));
}

#[tokio::test]
async fn other_kinds_count_only_spec_changes() {
    let (_server, client) = server().await;
    let ann = |v: &str| json!({"annotations": {"roost.dev/revision": v}});
    let template = |name: &str| {
        json!({
            "metadata": {"labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
        })
    };
    let mut sts_template = template("db");
    sts_template["spec"]["restartPolicy"] = json!("Always");
    let cases = vec![
        (
            "StatefulSet",
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
                "spec": {"replicas": 0, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": sts_template}}),
            "/spec/replicas",
            json!(1),
        ),
        (
            "DaemonSet",
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
                "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {
                    "metadata": {"labels": {"app": "agent"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
            "/spec/minReadySeconds",
            json!(5),
        ),
        (
            "ReplicaSet",
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs"},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "rs"}}, "template": {
                    "metadata": {"labels": {"app": "rs"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
            "/spec/replicas",
            json!(1),
        ),
        (
            "Job",
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
                "spec": {"template": template("once")}}),
            "/spec/backoffLimit",
            json!(2),
        ),
    ];
    for (kind, obj, field, value) in cases {
        let group = obj["apiVersion"]
            .as_str()
            .expect("apiVersion")
            .split('/')
            .next()
            .expect("group");
        let api = dynamic_api(&client, group, kind, Some("default"));
        assert_eq!(
            apply_generation(&api, &obj, json!({})).await,
            Some(1),
            "{kind}"
        );
        assert_eq!(
            apply_generation(&api, &obj, ann("a")).await,
            Some(1),
            "{kind} annotations"
        );
        let labels = json!({"labels": {"extra": "x"}});
        assert_eq!(
            apply_generation(&api, &obj, labels).await,
            Some(1),
            "{kind} labels"
        );
        let mut changed = obj.clone();
        let (parent, leaf) = field.rsplit_once('/').expect("field");
        changed.pointer_mut(parent).expect("parent")[leaf] = value;
        assert_eq!(
            apply_generation(&api, &changed, ann("a")).await,
            Some(2),
            "{kind} spec"
        );
    }

    // CRDs: the spec only.
    let crds = dynamic_api(
        &client,
        "apiextensions.k8s.io",
        "CustomResourceDefinition",
        None,
    );
    let crd = widget_crd();
    assert_eq!(apply_generation(&crds, &crd, json!({})).await, Some(1));
    assert_eq!(apply_generation(&crds, &crd, ann("a")).await, Some(1));
    let mut more = crd.clone();
    more["spec"]["names"]["shortNames"] = json!(["wd", "wdg"]);
    assert_eq!(apply_generation(&crds, &more, ann("a")).await, Some(2));

    // Custom resources: anything but metadata and (with a status subresource) status.
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let w = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}});
    eventually(3, "widget served", || {
        let widgets = widgets.clone();
        let w = w.clone();
        async move {
            widgets
                .patch("w", &PatchParams::apply("roost"), &Patch::Apply(&w))
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(apply_generation(&widgets, &w, ann("a")).await, Some(1));
    let status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await
        .expect("status");
    assert_eq!(status.metadata.generation, Some(1));
    let mut bigger = w.clone();
    bigger["spec"]["size"] = json!(2);
    assert_eq!(apply_generation(&widgets, &bigger, ann("a")).await, Some(2));
    let mut top = bigger.clone();
    top["extra"] = json!({"k": "v"});
    assert_eq!(apply_generation(&widgets, &top, ann("a")).await, Some(3));
}

#[tokio::test]
async fn namespace_termination_like_a_real_server() {
    let (server, client) = server().await;
    ensure_namespace(&client, "doomed").await;
    let pp = PatchParams::apply("roost");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    cms.patch("c", &pp, &Patch::Apply(labelled_cm("c", "roost", "1")))
        .await
        .expect("cm");
    let nss: Api<Namespace> = Api::all(client.clone());
    let rv = nss
        .get("doomed")
        .await
        .expect("ns")
        .metadata
        .resource_version
        .expect("rv");
    let mut events = nss
        .watch(&WatchParams::default().fields("metadata.name=doomed"), &rv)
        .await
        .expect("watch")
        .boxed();

    let deleted = nss
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete ns")
        .left()
        .expect("the namespace, terminating");
    assert!(deleted.metadata.deletion_timestamp.is_some());
    assert_eq!(
        deleted.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
    assert_eq!(
        deleted.spec.and_then(|s| s.finalizers),
        Some(vec!["kubernetes".to_string()])
    );

    // Creates are refused by the NamespaceLifecycle admission plugin, naming what was created.
    let err = api_error(
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(labelled_cm("late", "roost", "1")).expect("cm"),
        )
        .await
        .expect_err("forbidden"),
    );
    assert_eq!((err.code, err.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        err.message,
        "configmaps \"late\" is forbidden: unable to create new content in namespace doomed because it is being terminated"
    );
    let details = err.details.expect("details");
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("late", "configmaps")
    );
    assert_eq!(details.causes[0].reason, "NamespaceTerminating");
    assert_eq!(details.causes[0].field, "metadata.namespace");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "doomed");
    let err = api_error(
        deploys
            .patch(
                "web",
                &pp,
                &Patch::Apply(deployment("web", "nginx", json!({}))),
            )
            .await
            .expect_err("apply forbidden"),
    );
    assert_eq!(err.code, 403);
    assert_eq!(
        err.message,
        "deployments.apps \"web\" is forbidden: unable to create new content in namespace doomed because it is being terminated"
    );
    assert_eq!(err.details.expect("details").group, "apps");
    let mut generated = labelled_cm("", "roost", "1");
    generated["metadata"] = json!({"generateName": "gen-"});
    let err = api_error(
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(generated).expect("cm"),
        )
        .await
        .expect_err("forbidden"),
    );
    assert!(
        err.message.starts_with("configmaps \"gen-\" is forbidden"),
        "{}",
        err.message
    );

    // Updates are still allowed; the content goes, then the namespace.
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), events.try_next()).await {
            Ok(Ok(Some(WatchEvent::Modified(n)))) => {
                seen.push("MODIFIED");
                assert!(n.metadata.deletion_timestamp.is_some());
            }
            Ok(Ok(Some(WatchEvent::Deleted(n)))) => {
                seen.push("DELETED");
                assert_eq!(n.name_any(), "doomed");
                break;
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("namespace events: {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen.first(), Some(&"MODIFIED"));
    assert_eq!(
        api_error(cms.get("c").await.expect_err("content gone")).code,
        404
    );

    // Another finalizer holds the namespace after the content and `kubernetes` are gone,
    // until a client finalizes it.
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "held"}, "spec": {"finalizers": ["kubernetes", "example.com/hold"]}}))
            .expect("ns"),
    )
    .await
    .expect("held");
    // The propagation policy adds its finalizer, which the garbage collector handles.
    let pending = nss
        .delete("held", &DeleteParams::foreground())
        .await
        .expect("delete held")
        .left()
        .expect("terminating");
    assert_eq!(
        pending.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_string()])
    );
    let held = eventually(3, "kubernetes finalizer removed", || {
        let nss = nss.clone();
        async move {
            let n = nss.get("held").await.ok()?;
            let fs = n.spec.clone()?.finalizers?;
            let done =
                fs == vec!["example.com/hold".to_string()] && n.metadata.finalizers.is_none();
            done.then_some(n)
        }
    })
    .await;
    assert_eq!(
        held.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
    // Only the finalize subresource changes spec.finalizers.
    let patched = nss
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"finalizers": []}})),
        )
        .await
        .expect("patch");
    assert_eq!(
        patched.spec.and_then(|s| s.finalizers),
        Some(vec!["example.com/hold".to_string()])
    );
    let http = raw_http(&server);
    let (code, body) = http
        .put(
            "/api/v1/namespaces/held/finalize",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "held"}, "spec": {"finalizers": []}}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    eventually(3, "held namespace gone", || {
        let nss = nss.clone();
        async move { nss.get("held").await.err().map(|_| ()) }
    })
    .await;

    // A create always gets the kubernetes finalizer; foreground deletion of an empty
    // namespace ends with it gone.
    let created = nss
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "plain"}, "spec": {"finalizers": []}}),
            )
            .expect("ns"),
        )
        .await
        .expect("plain");
    assert_eq!(
        created.spec.and_then(|s| s.finalizers),
        Some(vec!["kubernetes".to_string()])
    );
    nss.delete("plain", &DeleteParams::foreground())
        .await
        .expect("delete plain");
    eventually(3, "plain namespace gone", || {
        let nss = nss.clone();
        async move { nss.get("plain").await.err().map(|_| ()) }
    })
    .await;
}

fn service(name: &str, labels: Value, spec: Value) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
    });
    if let (Some(m), Some(extra)) = (s["spec"].as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    s
}

fn manager_entries(obj: &DynamicObject) -> Vec<(String, String, String)> {
    obj.metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
                m.subresource.clone().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn services_get_endpoints_and_endpoint_slices() {
    let (server, client) = server().await;
    ensure_namespace(&client, "shop").await;
    let pp = PatchParams::apply("roost").force();
    let svcs = dynamic_api(&client, "", "Service", Some("shop"));
    let eps = dynamic_api(&client, "", "Endpoints", Some("shop"));
    let slices_ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
    ));
    let slices: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &slices_ar);
    let of_web = ListParams::default().labels("kubernetes.io/service-name=web");

    // Both kinds are served like any other.
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    for gvk in [
        GroupVersionKind::gvk("", "v1", "Endpoints"),
        GroupVersionKind::gvk("discovery.k8s.io", "v1", "EndpointSlice"),
    ] {
        let (ar, caps) = discovery.resolve_gvk(&gvk).expect("discovered");
        assert_eq!(caps.scope, KubeScope::Namespaced);
        for verb in [
            "list",
            "watch",
            "get",
            "delete",
            "deletecollection",
            "patch",
        ] {
            assert!(caps.supports_operation(verb), "{} {verb}", ar.plural);
        }
    }

    let labels = json!({"app": "web", "roost.dev/deployment": "shop"});
    let svc = svcs
        .patch(
            "web",
            &pp,
            &Patch::Apply(service("web", labels.clone(), json!({}))),
        )
        .await
        .expect("service");
    let ip = svc.data["spec"]["clusterIP"]
        .as_str()
        .expect("cluster IP")
        .to_string();
    assert!(ip.starts_with("10.96."), "{ip}");
    assert_eq!(svc.data["spec"]["clusterIPs"], json!([ip]));
    let svc_uid = svc.metadata.uid.clone().expect("uid");
    let created_at = json!(svc.metadata.creation_timestamp);

    let ep = eventually(3, "endpoints", || {
        let eps = eps.clone();
        async move { eps.get("web").await.ok() }
    })
    .await;
    assert_eq!(json!(ep.labels()), labels);
    assert!(ep.metadata.owner_references.is_none());
    assert_eq!(
        json!(ep.annotations()),
        json!({"endpoints.kubernetes.io/last-change-trigger-time": created_at})
    );
    assert!(ep.data.get("subsets").is_none(), "{:?}", ep.data);
    assert_eq!(
        manager_entries(&ep),
        vec![(
            "kube-controller-manager".into(),
            "Update".into(),
            String::new()
        )]
    );

    let slice = eventually(3, "endpoint slice", || {
        let slices = slices.clone();
        let of_web = of_web.clone();
        async move { slices.list(&of_web).await.ok()?.items.into_iter().next() }
    })
    .await;
    let slice_name = slice.name_any();
    assert!(
        slice_name.starts_with("web-") && slice_name.len() == "web-".len() + 5,
        "{slice_name}"
    );
    assert_eq!(slice.metadata.generate_name.as_deref(), Some("web-"));
    assert_eq!(
        json!(slice.labels()),
        json!({
            "app": "web", "roost.dev/deployment": "shop",
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        })
    );
    assert_eq!(
        serde_json::to_value(&slice.metadata.owner_references).expect("refs"),
        json!([{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": svc_uid,
            "controller": true, "blockOwnerDeletion": true}])
    );
    assert_eq!(slice.data["addressType"], "IPv4");
    assert_eq!(slice.metadata.generation, Some(1));
    assert_eq!(
        manager_entries(&slice),
        vec![(
            "kube-controller-manager".into(),
            "Update".into(),
            String::new()
        )]
    );
    // On the wire, as from a real server: the endpoint and port lists are null.
    let http = raw_http(&server);
    let (code, raw) = http
        .get(&format!(
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{slice_name}"
        ))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        (raw.get("endpoints"), raw.get("ports")),
        (Some(&Value::Null), Some(&Value::Null))
    );

    // Re-applying keeps the cluster IP; so does a PUT that leaves it out.
    let again = svcs
        .patch(
            "web",
            &pp,
            &Patch::Apply(service("web", labels.clone(), json!({}))),
        )
        .await
        .expect("re-apply");
    assert_eq!(again.data["spec"]["clusterIP"], json!(ip));
    let mut put = again.clone();
    if let Some(spec) = put.data["spec"].as_object_mut() {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
    }
    let replaced = svcs
        .replace("web", &PostParams::default(), &put)
        .await
        .expect("replace without cluster IP");
    assert_eq!(replaced.data["spec"]["clusterIP"], json!(ip));
    assert_eq!(replaced.data["spec"]["clusterIPs"], json!([ip]));

    // The Service's labels change: its children follow (the slice is updated in place).
    let relabelled = json!({"app": "web", "roost.dev/deployment": "shop", "tier": "frontend"});
    svcs.patch(
        "web",
        &pp,
        &Patch::Apply(service("web", relabelled.clone(), json!({}))),
    )
    .await
    .expect("relabel");
    let ep = eventually(3, "endpoints relabelled", || {
        let eps = eps.clone();
        async move {
            let ep = eps.get("web").await.ok()?;
            (ep.labels().get("tier").map(String::as_str) == Some("frontend")).then_some(ep)
        }
    })
    .await;
    assert_eq!(json!(ep.labels()), relabelled);
    assert!(
        ep.metadata.annotations.is_none(),
        "{:?}",
        ep.metadata.annotations
    );
    let slice = eventually(3, "slice relabelled", || {
        let slices = slices.clone();
        let name = slice_name.clone();
        async move {
            let s = slices.get(&name).await.ok()?;
            (s.labels().get("tier").map(String::as_str) == Some("frontend")).then_some(s)
        }
    })
    .await;
    assert_eq!(slice.metadata.generation, Some(2));
    assert_eq!(slices.list(&of_web).await.expect("list").items.len(), 1);

    // What an inventory search by label finds, across namespaces.
    let roost = ListParams::default().labels("roost.dev/deployment=shop");
    let all_eps = dynamic_api(&client, "", "Endpoints", None);
    let found: Vec<String> = all_eps
        .list(&roost)
        .await
        .expect("list endpoints")
        .items
        .iter()
        .map(|e| e.name_any())
        .collect();
    assert_eq!(found, vec!["web"]);

    // Deleted children come back: the controllers keep them.
    eps.delete("web", &DeleteParams::default())
        .await
        .expect("delete endpoints");
    slices
        .delete(&slice_name, &DeleteParams::default())
        .await
        .expect("delete slice");
    eventually(3, "endpoints recreated", || {
        let eps = eps.clone();
        async move { eps.get("web").await.ok() }
    })
    .await;
    let recreated = eventually(3, "slice recreated", || {
        let slices = slices.clone();
        let of_web = of_web.clone();
        async move { slices.list(&of_web).await.ok()?.items.into_iter().next() }
    })
    .await;
    assert_ne!(recreated.name_any(), slice_name);

    // Headless Services are marked; Services without a selector get nothing. (As in
    // 1.24, an ExternalName Service with a selector gets them too, as headless, with
    // a slice per address type.)
    svcs.patch(
        "db",
        &pp,
        &Patch::Apply(service(
            "db",
            json!({"app": "db"}),
            json!({"clusterIP": "None"}),
        )),
    )
    .await
    .expect("headless");
    let mut manual = service("manual", json!({}), json!({}));
    manual["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("selector");
    svcs.patch("manual", &pp, &Patch::Apply(&manual))
        .await
        .expect("selectorless");
    svcs.patch(
        "ext",
        &pp,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.com", "selector": {"app": "ext"}}})),
    )
    .await
    .expect("external name");
    let db = eventually(3, "headless endpoints", || {
        let eps = eps.clone();
        async move { eps.get("db").await.ok() }
    })
    .await;
    assert_eq!(
        json!(db.labels()),
        json!({"app": "db", "service.kubernetes.io/headless": ""})
    );
    let ext = eventually(3, "external name endpoints", || {
        let eps = eps.clone();
        async move { eps.get("ext").await.ok() }
    })
    .await;
    assert_eq!(
        ext.labels()
            .get("service.kubernetes.io/headless")
            .map(String::as_str),
        Some("")
    );
    let ext_types = eventually(3, "external name slices", || {
        let slices = slices.clone();
        async move {
            let lp = ListParams::default().labels("kubernetes.io/service-name=ext");
            let mut types: Vec<String> = slices
                .list(&lp)
                .await
                .ok()?
                .items
                .iter()
                .map(|s| {
                    s.data["addressType"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            types.sort();
            (types.len() == 2).then_some(types)
        }
    })
    .await;
    assert_eq!(ext_types, vec!["IPv4", "IPv6"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        eps.get("manual").await.is_err(),
        "no endpoints without a selector"
    );
    let lp = ListParams::default().labels("kubernetes.io/service-name=manual");
    assert!(slices.list(&lp).await.expect("list").items.is_empty());

    // The Service goes: the endpoints controller deletes the Endpoints, the garbage
    // collector the slice. Created again, it gets a new cluster IP and new children.
    svcs.delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    eventually(3, "children gone", || {
        let eps = eps.clone();
        let slices = slices.clone();
        let of_web = of_web.clone();
        async move {
            let no_ep = eps.get("web").await.is_err();
            let no_slice = slices.list(&of_web).await.ok()?.items.is_empty();
            (no_ep && no_slice).then_some(())
        }
    })
    .await;
    let again = svcs
        .patch(
            "web",
            &pp,
            &Patch::Apply(service("web", labels.clone(), json!({}))),
        )
        .await
        .expect("service again");
    assert_ne!(again.data["spec"]["clusterIP"], json!(ip));
    let new_uid = again.metadata.uid.clone().expect("uid");
    eventually(3, "new children", || {
        let slices = slices.clone();
        let of_web = of_web.clone();
        let new_uid = new_uid.clone();
        async move {
            let s = slices.list(&of_web).await.ok()?.items.into_iter().next()?;
            let owner = s.metadata.owner_references.as_ref()?.first()?.uid.clone();
            (owner == new_uid).then_some(())
        }
    })
    .await;

    // The apiserver's own Service has its endpoints from the start.
    let default_eps = dynamic_api(&client, "", "Endpoints", Some("default"));
    let k = default_eps
        .get("kubernetes")
        .await
        .expect("kubernetes endpoints");
    assert_eq!(k.data["subsets"][0]["ports"][0]["port"], 6443);
    let default_slices: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &slices_ar);
    let k = default_slices
        .get("kubernetes")
        .await
        .expect("kubernetes endpoint slice");
    assert_eq!(
        k.labels()
            .get("kubernetes.io/service-name")
            .map(String::as_str),
        Some("kubernetes")
    );
}

fn replica_sets(client: &kube::Client, ns: &str) -> Api<k8s_openapi::api::apps::v1::ReplicaSet> {
    Api::namespaced(client.clone(), ns)
}

fn with_annotations(mut d: Value, annotations: Value) -> Value {
    d["metadata"]["annotations"] = annotations;
    d
}

/// Wait until the Deployment is observed, complete and available (kstatus-style).
async fn rolled_out(deploys: &Api<Deployment>, name: &str) -> Deployment {
    eventually(5, &format!("{name} rolled out"), || {
        let deploys = deploys.clone();
        let name = name.to_string();
        async move {
            let d = deploys.get(&name).await.ok()?;
            let want = d.spec.as_ref()?.replicas.unwrap_or(1);
            let s = d.status.as_ref()?;
            let progressing = s
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Progressing")?;
            let done = s.observed_generation == d.metadata.generation
                && s.updated_replicas.unwrap_or(0) == want
                && s.replicas.unwrap_or(0) == want
                && s.available_replicas.unwrap_or(0) == want
                && progressing.reason.as_deref() == Some("NewReplicaSetAvailable");
            done.then_some(d)
        }
    })
    .await
}

#[tokio::test]
async fn deployments_roll_out_through_replica_sets() {
    let (_server, client) = server().await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss = replica_sets(&client, "default");
    let pp = PatchParams::apply("roost").force();
    let manifest = |image: &str, revision: &str| {
        with_annotations(
            deployment("web", image, json!({"replicas": 2})),
            json!({"roost.dev/revision": revision}),
        )
    };
    deploys
        .patch("web", &pp, &Patch::Apply(manifest("nginx:1.27", "r1")))
        .await
        .expect("apply");
    let d = rolled_out(&deploys, "web").await;
    let d_uid = d.metadata.uid.clone().expect("uid");
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("1")
    );
    let all = rss.list(&ListParams::default()).await.expect("list").items;
    assert_eq!(all.len(), 1);
    let rs = &all[0];
    let hash = rs
        .labels()
        .get("pod-template-hash")
        .cloned()
        .expect("hash label");
    assert!(
        !hash.is_empty() && hash.chars().all(|c| "bcdfg456789".contains(c)),
        "{hash}"
    );
    assert_eq!(rs.name_any(), format!("web-{hash}"));
    assert_eq!(
        json!(rs.labels()),
        json!({"app": "web", "pod-template-hash": hash})
    );
    let spec = rs.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        json!(spec.selector.match_labels),
        json!({"app": "web", "pod-template-hash": hash})
    );
    assert_eq!(
        spec.template
            .as_ref()
            .and_then(|t| t.metadata.as_ref())
            .map(|m| json!(m.labels)),
        Some(json!({"app": "web", "pod-template-hash": hash}))
    );
    assert_eq!(
        json!(rs.annotations()),
        json!({
            "roost.dev/revision": "r1",
            "deployment.kubernetes.io/revision": "1",
            "deployment.kubernetes.io/desired-replicas": "2",
            "deployment.kubernetes.io/max-replicas": "3",
        })
    );
    assert_eq!(
        serde_json::to_value(&rs.metadata.owner_references).expect("refs"),
        json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": d_uid,
            "controller": true, "blockOwnerDeletion": true}])
    );
    let st = rs.status.as_ref().expect("rs status");
    assert_eq!(
        (
            st.replicas,
            st.ready_replicas,
            st.available_replicas,
            st.observed_generation
        ),
        (2, Some(2), Some(2), Some(1))
    );
    assert!(managers(rs).contains(&("kube-controller-manager".into(), "Update".into())));
    let rs1 = rs.name_any();

    // A new annotation: a new generation, copied to the same ReplicaSet.
    let a = deploys
        .patch("web", &pp, &Patch::Apply(manifest("nginx:1.27", "r2")))
        .await
        .expect("annotate");
    assert_eq!(a.metadata.generation, Some(2));
    eventually(3, "annotation copied", || {
        let rss = rss.clone();
        let rs1 = rs1.clone();
        async move {
            let rs = rss.get(&rs1).await.ok()?;
            (rs.annotations()
                .get("roost.dev/revision")
                .map(String::as_str)
                == Some("r2"))
            .then_some(())
        }
    })
    .await;
    rolled_out(&deploys, "web").await;
    assert_eq!(
        rss.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    // A new template: a new ReplicaSet, rolled out within maxSurge/maxUnavailable
    // (2 replicas: at most 3 pods, at least 2 available), the old one scaled to zero.
    deploys
        .patch("web", &pp, &Patch::Apply(manifest("nginx:1.28", "r3")))
        .await
        .expect("new image");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let d = deploys.get("web").await.expect("get");
        let items = rss.list(&ListParams::default()).await.expect("list").items;
        let desired: i32 = items.iter().filter_map(|r| r.spec.as_ref()?.replicas).sum();
        let available: i32 = items
            .iter()
            .filter_map(|r| r.status.as_ref()?.available_replicas)
            .sum();
        assert!(desired <= 3, "surge bound: {desired}");
        assert!(available >= 2, "availability bound: {available}");
        let s = d.status.clone().unwrap_or_default();
        if items.len() == 2
            && s.observed_generation == d.metadata.generation
            && s.updated_replicas == Some(2)
            && s.replicas == Some(2)
            && s.available_replicas == Some(2)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "rollout: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let d = rolled_out(&deploys, "web").await;
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("2")
    );
    let old = rss.get(&rs1).await.expect("old rs kept");
    assert_eq!(old.spec.as_ref().and_then(|s| s.replicas), Some(0));
    assert_eq!(old.status.as_ref().map(|s| s.replicas), Some(0));
    let rs2 = rss
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|r| r.name_any())
        .find(|n| *n != rs1)
        .expect("new rs");
    let progressing = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
        .expect("progressing")
        .clone();
    assert_eq!(
        progressing.message.as_deref(),
        Some(format!("ReplicaSet \"{rs2}\" has successfully progressed.").as_str())
    );

    // Back to the first template: its ReplicaSet comes back with the next revision.
    deploys
        .patch("web", &pp, &Patch::Apply(manifest("nginx:1.27", "r4")))
        .await
        .expect("roll back");
    let d = rolled_out(&deploys, "web").await;
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("3")
    );
    let back = rss.get(&rs1).await.expect("first rs");
    assert_eq!(back.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let ann = back.annotations();
    assert_eq!(
        (
            ann.get("deployment.kubernetes.io/revision")
                .map(String::as_str),
            ann.get("deployment.kubernetes.io/revision-history")
                .map(String::as_str)
        ),
        (Some("3"), Some("1"))
    );
    assert_eq!(
        rss.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );

    // Old ReplicaSets beyond revisionHistoryLimit are deleted once the rollout is done.
    let mut limited = manifest("nginx:1.29", "r5");
    limited["spec"]["revisionHistoryLimit"] = json!(1);
    deploys
        .patch("web", &pp, &Patch::Apply(&limited))
        .await
        .expect("limit history");
    rolled_out(&deploys, "web").await;
    let names = eventually(3, "history cleaned up", || {
        let rss = rss.clone();
        async move {
            let names: Vec<String> = rss
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .map(|r| r.name_any())
                .collect();
            (names.len() == 2).then_some(names)
        }
    })
    .await;
    assert!(names.contains(&rs1), "{names:?}");
    assert!(!names.contains(&rs2), "{names:?}");

    // Deleting the Deployment garbage-collects its ReplicaSets.
    deploys
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(3, "replica sets collected", || {
        let rss = rss.clone();
        async move {
            rss.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn recreate_zero_replicas_orphans_and_stuck_rollouts() {
    let (server, client) = server().await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss = replica_sets(&client, "default");
    let pp = PatchParams::apply("roost").force();

    // Recreate: the old ReplicaSet is scaled down before the new one scales up.
    let recreate = |image: &str| {
        deployment(
            "batch",
            image,
            json!({"replicas": 1, "strategy": {"type": "Recreate"}}),
        )
    };
    deploys
        .patch("batch", &pp, &Patch::Apply(recreate("busybox:1")))
        .await
        .expect("recreate");
    rolled_out(&deploys, "batch").await;
    deploys
        .patch("batch", &pp, &Patch::Apply(recreate("busybox:2")))
        .await
        .expect("recreate update");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let items = rss.list(&ListParams::default()).await.expect("list").items;
        let running = items
            .iter()
            .filter(|r| r.status.as_ref().is_some_and(|s| s.replicas > 0))
            .count();
        assert!(running <= 1, "old and new pods at once");
        let d = deploys.get("batch").await.expect("get");
        let s = d.status.clone().unwrap_or_default();
        if items.len() == 2
            && s.observed_generation == d.metadata.generation
            && s.available_replicas == Some(1)
            && s.updated_replicas == Some(1)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "recreate: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // replicas: 0 is available with no pods at all (and its ReplicaSet at zero).
    deploys
        .patch(
            "idle",
            &pp,
            &Patch::Apply(deployment("idle", "nginx", json!({"replicas": 0}))),
        )
        .await
        .expect("idle");
    let idle = rolled_out(&deploys, "idle").await;
    let s = idle.status.expect("status");
    let available = s
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Available")
        .expect("available");
    assert_eq!(available.status, "True");
    assert_eq!((s.replicas, s.available_replicas), (None, None));
    let idle_rs = rss
        .list(&ListParams::default().labels("app=idle"))
        .await
        .expect("list")
        .items;
    assert_eq!(idle_rs.len(), 1);
    assert_eq!(idle_rs[0].spec.as_ref().and_then(|s| s.replicas), Some(0));

    // Orphaned ReplicaSets stay; a new Deployment with the same selector adopts them.
    deploys
        .delete("idle", &DeleteParams::orphan())
        .await
        .expect("orphan delete");
    let orphan = eventually(3, "orphaned", || {
        let rss = rss.clone();
        let deploys = deploys.clone();
        async move {
            let gone = deploys.get("idle").await.is_err();
            let rs = rss
                .list(&ListParams::default().labels("app=idle"))
                .await
                .ok()?
                .items
                .into_iter()
                .next()?;
            (gone
                && rs
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_none_or(Vec::is_empty))
            .then_some(rs)
        }
    })
    .await;
    let again = deploys
        .patch(
            "idle",
            &pp,
            &Patch::Apply(deployment("idle", "nginx", json!({"replicas": 0}))),
        )
        .await
        .expect("idle again");
    let new_uid = again.metadata.uid.clone().expect("uid");
    eventually(3, "adopted", || {
        let rss = rss.clone();
        let name = orphan.name_any();
        let new_uid = new_uid.clone();
        async move {
            let rs = rss.get(&name).await.ok()?;
            let owner = rs.metadata.owner_references.as_ref()?.first()?.uid.clone();
            (owner == new_uid).then_some(())
        }
    })
    .await;
    rolled_out(&deploys, "idle").await;
    assert_eq!(
        rss.list(&ListParams::default().labels("app=idle"))
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    // never_available: the ReplicaSet has its replicas, none of them ever available.
    server.never_available("default", "stuck");
    deploys
        .patch(
            "stuck",
            &pp,
            &Patch::Apply(deployment("stuck", "nginx", json!({"replicas": 2}))),
        )
        .await
        .expect("stuck");
    let rs = eventually(3, "stuck replica set", || {
        let rss = rss.clone();
        async move {
            let rs = rss
                .list(&ListParams::default().labels("app=stuck"))
                .await
                .ok()?
                .items
                .into_iter()
                .next()?;
            (rs.status.as_ref()?.replicas == 2).then_some(rs)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rs = rss.get(&rs.name_any()).await.expect("rs");
    assert_eq!(rs.status.and_then(|s| s.available_replicas), None);
}

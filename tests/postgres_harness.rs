//! The test harness's PostgreSQL is real and usable: the billing store's tests rely on
//! it, so its setup is checked on its own.

use tokio_postgres::NoTls;

fn database_url() -> String {
    std::env::var("TALLY_TEST_PG_URL").expect(
        "TALLY_TEST_PG_URL is not set: run the tests through deploy/local/test.sh, \
         which starts a real PostgreSQL",
    )
}

#[tokio::test]
async fn harness_postgres_accepts_transactions_on_loopback() {
    let url = database_url();
    assert!(
        url.contains("127.0.0.1"),
        "tests only touch loopback: {url}"
    );
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    let driver = tokio::spawn(connection);

    let version: String = client
        .query_one("show server_version", &[])
        .await
        .expect("version")
        .get(0);
    assert!(!version.is_empty());

    let table = format!("harness_{}", std::process::id());
    client
        .batch_execute(&format!(
            "create temporary table {table} (id text primary key, micros bigint not null)"
        ))
        .await
        .expect("create table");
    let transaction = client.transaction().await.expect("begin");
    transaction
        .execute(
            &format!("insert into {table} values ($1, $2), ($3, $4)"),
            &[&"a", &1_i64, &"b", &2_i64],
        )
        .await
        .expect("insert");
    transaction.commit().await.expect("commit");
    let duplicate = client
        .execute(
            &format!("insert into {table} values ($1, $2)"),
            &[&"a", &5_i64],
        )
        .await;
    assert!(duplicate.is_err(), "the primary key holds");
    let total: i64 = client
        .query_one(&format!("select sum(micros)::bigint from {table}"), &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(total, 3);
    drop(client);
    driver
        .await
        .expect("connection task")
        .expect("connection closed cleanly");
}

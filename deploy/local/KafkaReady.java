// Readiness probe for the local test broker (used by deploy/local/kafka.sh).
//
// The broker counts as ready only once, within one deadline:
//   (a) AdminClient creates a fresh topic, and
//   (b) a transactional producer runs initTransactions, sends one record to
//       that topic and commits.
// Each failed attempt is retried until the deadline. Exit 0 and print the
// bootstrap address on success; exit 1 with the last error otherwise.
//
// Usage: java -cp "libs/*:classes" KafkaReady <bootstrap> [timeout-seconds]

import java.time.Duration;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringSerializer;

public final class KafkaReady {
    private KafkaReady() {}

    public static void main(String[] args) throws InterruptedException {
        if (args.length < 1 || args.length > 2) {
            System.err.println("usage: KafkaReady <bootstrap> [timeout-seconds]");
            System.exit(2);
        }
        String bootstrap = args[0];
        long timeoutMs = TimeUnit.SECONDS.toMillis(args.length == 2 ? Long.parseLong(args[1]) : 60);
        long deadline = System.currentTimeMillis() + timeoutMs;
        String suffix = UUID.randomUUID().toString();
        String topic = "tally-ready-" + suffix;
        String txnId = "tally-ready-" + suffix;

        boolean topicCreated = false;
        Exception last = null;
        int attempt = 0;
        while (System.currentTimeMillis() < deadline) {
            attempt++;
            try {
                if (!topicCreated) {
                    createTopic(bootstrap, topic, remaining(deadline));
                    topicCreated = true;
                    log("created topic " + topic + " (attempt " + attempt + ")");
                }
                RecordMetadata md = transactionalSend(bootstrap, topic, txnId, remaining(deadline));
                log("initTransactions + commit ok (transactional.id=" + txnId + ", offset "
                        + md.offset() + ", attempt " + attempt + ")");
                deleteTopic(bootstrap, topic);
                System.out.println(bootstrap);
                System.exit(0);
            } catch (Exception e) {
                last = e;
                log("attempt " + attempt + " not ready yet: " + describe(e));
                Thread.sleep(Math.min(500, Math.max(0, remaining(deadline))));
            }
        }
        System.err.println("KafkaReady: broker at " + bootstrap + " not ready after "
                + TimeUnit.MILLISECONDS.toSeconds(timeoutMs) + " s"
                + (topicCreated ? " (topic created, transactions failed)" : " (topic create failed)")
                + "; last error: " + (last == null ? "none" : describe(last)));
        System.exit(1);
    }

    private static void createTopic(String bootstrap, String topic, long budgetMs) throws Exception {
        try (Admin admin = Admin.create(adminProps(bootstrap, budgetMs))) {
            admin.createTopics(List.of(new NewTopic(topic, 1, (short) 1)))
                    .all()
                    .get(Math.max(1, budgetMs), TimeUnit.MILLISECONDS);
        } catch (ExecutionException e) {
            // A retried create whose first try landed late is fine.
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw e;
            }
        }
    }

    private static void deleteTopic(String bootstrap, String topic) {
        // Best effort: leave the broker as empty as we found it.
        try (Admin admin = Admin.create(adminProps(bootstrap, 10_000))) {
            admin.deleteTopics(List.of(topic)).all().get(10, TimeUnit.SECONDS);
        } catch (Exception e) {
            log("could not delete " + topic + ": " + describe(e));
        }
    }

    private static RecordMetadata transactionalSend(String bootstrap, String topic, String txnId, long budgetMs)
            throws Exception {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, txnId);
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, "30000");
        int block = (int) Math.max(1_000, Math.min(budgetMs, 30_000));
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, Integer.toString(block));
        p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, Integer.toString(Math.min(block, 10_000)));
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Integer.toString(Math.max(block, 11_000)));
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        KafkaProducer<String, String> producer = new KafkaProducer<>(p);
        try {
            producer.initTransactions();
            producer.beginTransaction();
            RecordMetadata md = producer.send(new ProducerRecord<>(topic, "ready", "ready"))
                    .get(block, TimeUnit.MILLISECONDS);
            producer.commitTransaction();
            return md;
        } finally {
            producer.close(Duration.ofSeconds(5));
        }
    }

    private static Properties adminProps(String bootstrap, long budgetMs) {
        int t = (int) Math.max(1_000, Math.min(budgetMs, 15_000));
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, Integer.toString(t));
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, Integer.toString(t));
        return p;
    }

    private static long remaining(long deadline) {
        return deadline - System.currentTimeMillis();
    }

    private static String describe(Throwable e) {
        Throwable root = e;
        while ((root instanceof ExecutionException) && root.getCause() != null) {
            root = root.getCause();
        }
        return root.getClass().getSimpleName() + ": " + root.getMessage();
    }

    private static void log(String msg) {
        System.err.println("KafkaReady: " + msg);
    }
}

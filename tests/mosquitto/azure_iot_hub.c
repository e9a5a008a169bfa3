/*
 * A Mosquitto 2.0 plugin that makes a test Mosquitto check a device's login and topics as
 * Azure IoT Hub does (Microsoft's "Communicate with an IoT hub using the MQTT protocol" and
 * "Control access to IoT Hub with SAS tokens"), so that the gateway's azure-iot-hub profile
 * is proved against the hub's rules without the hub:
 *
 *   - MQTT 3.1.1 only;
 *   - client id = the device id;
 *   - user name `{hub}/{device}/?api-version=...`;
 *   - password a SAS token `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}`
 *     (any order of the three), with the expected URL-encoded resource, an expiry in the
 *     future, and a signature that is base64(HMAC-SHA256(key, resource "\n" expiry)),
 *     URL-encoded, under the device key;
 *   - the device may publish only below `devices/{device}/messages/events/`.
 *
 * One more user, `watcher`, with its own password, may read everything and publish nothing:
 * the test's subscriber. Every decision is appended, with its reason, to the journal file.
 *
 * Options (plugin_opt_*): device, username, resource, key (base64), watcher_password,
 * journal. Built by the test that uses it: cc -shared -fPIC ... -lcrypto.
 * Test code only: it is not part of Watchpost.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin;
static const char *device, *username, *resource, *key_b64, *watcher_password, *journal_path;

static void journal(const char *verdict, const char *client, const char *why)
{
	FILE *f = fopen(journal_path, "a");
	if (f) {
		fprintf(f, "%s %s: %s\n", verdict, client ? client : "(none)", why);
		fclose(f);
	}
}

static int refuse(const char *client, const char *why)
{
	journal("refused", client, why);
	return MOSQ_ERR_AUTH;
}

/* The value of `name=` in the `&`-separated list `fields`, copied to `out`. */
static int field(const char *fields, const char *name, char *out, size_t size)
{
	size_t n = strlen(name);
	const char *p = fields;
	while (p && *p) {
		const char *end = strchr(p, '&');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if (len > n && strncmp(p, name, n) == 0 && p[n] == '=') {
			size_t vlen = len - n - 1;
			if (vlen + 1 > size)
				return 0;
			memcpy(out, p + n + 1, vlen);
			out[vlen] = '\0';
			return 1;
		}
		p = end ? end + 1 : NULL;
	}
	return 0;
}

static void url_decode(const char *in, char *out)
{
	while (*in) {
		if (in[0] == '%' && in[1] && in[2]) {
			char hex[3] = {in[1], in[2], 0};
			*out++ = (char)strtol(hex, NULL, 16);
			in += 3;
		} else {
			*out++ = *in++;
		}
	}
	*out = '\0';
}

static int check_token(const char *client, const char *password)
{
	const char *prefix = "SharedAccessSignature ";
	char sr[512], sig[512], se[64], signature[512], message[600];
	unsigned char key[256], mac[EVP_MAX_MD_SIZE], expected[128];
	unsigned int mac_len = 0;
	int key_len;

	if (strncmp(password, prefix, strlen(prefix)) != 0)
		return refuse(client, "the password is not a SharedAccessSignature");
	password += strlen(prefix);
	if (!field(password, "sr", sr, sizeof sr) || !field(password, "sig", sig, sizeof sig)
	    || !field(password, "se", se, sizeof se))
		return refuse(client, "the token lacks sr, sig or se");
	if (strcmp(sr, resource) != 0)
		return refuse(client, "the token is for another resource");
	if (strtoll(se, NULL, 10) <= (long long)time(NULL))
		return refuse(client, "the token has expired");
	key_len = EVP_DecodeBlock(key, (const unsigned char *)key_b64, (int)strlen(key_b64));
	if (key_len <= 0)
		return refuse(client, "the test's key is not base64");
	/* EVP_DecodeBlock counts the padding as bytes. */
	for (const char *p = key_b64 + strlen(key_b64); p > key_b64 && p[-1] == '='; p--)
		key_len--;
	snprintf(message, sizeof message, "%s\n%s", sr, se);
	HMAC(EVP_sha256(), key, key_len, (const unsigned char *)message, strlen(message), mac,
	     &mac_len);
	EVP_EncodeBlock(expected, mac, (int)mac_len);
	url_decode(sig, signature);
	if (strcmp(signature, (const char *)expected) != 0)
		return refuse(client, "the signature does not match the device key");
	journal("accepted", client, "SAS token");
	return MOSQ_ERR_SUCCESS;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client = mosquitto_client_id(ed->client);
	(void)event;
	(void)userdata;

	if (ed->username && strcmp(ed->username, "watcher") == 0) {
		if (ed->password && strcmp(ed->password, watcher_password) == 0)
			return MOSQ_ERR_SUCCESS;
		return refuse(client, "wrong watcher password");
	}
	if (mosquitto_client_protocol_version(ed->client) != 4)
		return refuse(client, "the hub speaks MQTT 3.1.1 only");
	if (!client || strcmp(client, device) != 0)
		return refuse(client, "the client id is not the device id");
	if (!ed->username || strcmp(ed->username, username) != 0)
		return refuse(client, "the user name is not {hub}/{device}/?api-version=...");
	if (!ed->password)
		return refuse(client, "no password (SAS token)");
	return check_token(client, ed->password);
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user = mosquitto_client_username(ed->client);
	char events[256];
	(void)event;
	(void)userdata;

	if (user && strcmp(user, "watcher") == 0)
		return ed->access == MOSQ_ACL_WRITE ? MOSQ_ERR_ACL_DENIED : MOSQ_ERR_SUCCESS;
	if (ed->access != MOSQ_ACL_WRITE)
		return MOSQ_ERR_ACL_DENIED;
	snprintf(events, sizeof events, "devices/%s/messages/events/", device);
	if (strncmp(ed->topic, events, strlen(events)) == 0)
		return MOSQ_ERR_SUCCESS;
	journal("denied", mosquitto_client_id(ed->client), ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

int mosquitto_plugin_version(int count, const int *versions)
{
	for (int i = 0; i < count; i++)
		if (versions[i] == 5)
			return 5;
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
			  struct mosquitto_opt *options, int count)
{
	(void)userdata;
	plugin = identifier;
	for (int i = 0; i < count; i++) {
		const char *k = options[i].key, *v = options[i].value;
		if (strcmp(k, "device") == 0)
			device = v;
		else if (strcmp(k, "username") == 0)
			username = v;
		else if (strcmp(k, "resource") == 0)
			resource = v;
		else if (strcmp(k, "key") == 0)
			key_b64 = v;
		else if (strcmp(k, "watcher_password") == 0)
			watcher_password = v;
		else if (strcmp(k, "journal") == 0)
			journal_path = v;
	}
	if (!device || !username || !resource || !key_b64 || !watcher_password || !journal_path)
		return MOSQ_ERR_INVAL;
	mosquitto_callback_register(plugin, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	mosquitto_callback_register(plugin, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int count)
{
	(void)userdata;
	(void)options;
	(void)count;
	mosquitto_callback_unregister(plugin, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	return MOSQ_ERR_SUCCESS;
}

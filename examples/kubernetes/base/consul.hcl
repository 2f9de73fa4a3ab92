# The Consul servers of dc2, a secondary datacenter federated with dc1 through mesh gateways.
datacenter         = "dc2"
primary_datacenter = "dc1"
server             = true
bootstrap_expect   = 3
data_dir           = "/consul/data"
retry_join         = ["consul-server-0.consul-server", "consul-server-1.consul-server", "consul-server-2.consul-server"]
# WAN federation through mesh gateways: no retry_join_wan or start_join_wan; the primary is
# reached through its gateways, then through this datacenter's own (the meshgw sidecars).
primary_gateways = ["203.0.113.5:443", "203.0.113.6:443"]
connect {
  enabled                            = true
  enable_mesh_gateway_wan_federation = true
}
tls {
  defaults {
    ca_file         = "/consul/tls/consul-agent-ca.pem"
    cert_file       = "/consul/tls/server.pem"
    key_file        = "/consul/tls/server-key.pem"
    verify_incoming = true
    verify_outgoing = true
  }
  internal_rpc {
    verify_server_hostname = true
  }
}
ports {
  https = 8501
}

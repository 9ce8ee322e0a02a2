// Aligned text tables in the manner of kubectl: upper-case headers, columns
// separated by three spaces, no trailing padding.
#ifndef PORTFLEET_CTL_TABLE_H_
#define PORTFLEET_CTL_TABLE_H_

#include <ostream>
#include <string>
#include <vector>

namespace portfleet::ctl {

class Table {
 public:
  explicit Table(std::vector<std::string> headers);
  void AddRow(std::vector<std::string> cells);
  void Print(std::ostream& out) const;

 private:
  std::vector<std::vector<std::string>> rows_;
};

}  // namespace portfleet::ctl

#endif  // PORTFLEET_CTL_TABLE_H_
